"""The reconstruction page (Gradio) and its command line.

    python app.py --model outputs/mae-demo               # http://127.0.0.1:7860
    python app.py --model facebook/vit-mae-base --port 8080
    python app.py --model mae_visualize_vit_large.pth --host 0.0.0.0

Left: the image (upload a file: PNG / JPEG / 16-bit PNG / TIFF / .npy, or pick one of the examples) and
the controls (mask ratio, masking strategy, seed, display window, and for multi-band models the band
triple); right: original | masked | reconstruction | reconstruction with the visible patches pasted |
per-patch error map, and a line of numbers. Every control re-runs the model on the image.

Nothing here reaches the internet: Gradio's analytics and version check are off
(`GRADIO_ANALYTICS_ENABLED=False` unless set), the theme uses the system's fonts (no web fonts), and
no share link is made.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PANEL_LABELS = {
    "original": "original",
    "masked": "masked",
    "reconstruction": "reconstruction",
    "pasted": "recon. + visible patches",
    "error": "error per patch (visible: gray)",
}
IMAGE_FILE_TYPES = ["image", ".npy", ".tif", ".tiff"]


@dataclass(frozen=True)
class AppConfig:
    """The reconstruction page of a pretrained MAE."""

    model: str = option("", help="MAE: our export directory, a ViTMAE directory or Hub id, an official .pth (required)",
                        hub_or_path=True)
    # what the checkpoint's weights cannot say (official files of other widths)
    num_attention_heads: Optional[int] = option(None, help="encoder heads; official widths 768/1024/1280 need none")
    decoder_num_attention_heads: Optional[int] = option(None, help="decoder heads (512-d decoder: 16)")
    crop_pct: float = option(1.0, help="resize the shorter side to size / crop_pct, then centre-crop the model's size")
    num_threads: Optional[int] = option(None, help="CPU threads (torch.set_num_threads); default: torch's (all cores)")
    host: Optional[str] = option(None, help="address to listen on; default 127.0.0.1 (GRADIO_SERVER_NAME)")
    port: Optional[int] = option(None, help="port; default 7860 or the next free one (GRADIO_SERVER_PORT)")

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


def info_markdown(result, loaded, seconds: float, scale_note: str | None) -> str:
    """The numbers under the panels: the loss, the error map's scale, the window, the time (decode to panels)."""
    lines = [
        f"**Loss** (mean per-patch error over the {result.num_removed} removed of {result.num_patches} patches, "
        f"in the loss's space): **{result.loss:.4f}**. Error map: 0 (dark purple) to {result.error_max:.4g} "
        f"(yellow); visible patches gray.",
        f"{result.caption} Display: {result.window}. {seconds:.2f} s on {loaded.model.device} (decode to panels).",
    ]
    if scale_note:
        lines.append(f"Note: {scale_note}.")
    return "\n\n".join(lines)


def build_demo(loaded, examples: list[str] | None = None):
    """The page for `loaded` (`reconstruction.LoadedModel`), with `examples` (file paths) to pick from."""
    import gradio as gr

    from modeling_mae.training.pixels import decode_array

    from .reconstruction import MASK_STRATEGIES, PANELS, WINDOWS, reconstruct_image

    config = loaded.model.config
    channels = loaded.num_channels
    multi_band = channels not in (1, 3)

    def run(path, mask_ratio, mask_strategy, seed, window, red, green, blue):
        if not path:
            return [None] * len(PANELS) + ["Upload an image or pick an example."]
        start = time.perf_counter()
        try:
            array = decode_array(path)
            pixel_values = loaded.prepare(array)
            bands = (int(red), int(green), int(blue)) if multi_band else None
            result = reconstruct_image(loaded, pixel_values, float(mask_ratio), mask_strategy, int(seed or 0),
                                       bands=bands, window=window)
        except ValueError as err:  # the image, not the page: say what was expected, in one line
            raise gr.Error(str(err), print_exception=False) from None
        info = info_markdown(result, loaded, time.perf_counter() - start, loaded.scale_note(array))
        return [result.panels[key] for key in PANELS] + [info]

    with gr.Blocks(title="MAE reconstruction") as demo:
        gr.Markdown(f"## MAE reconstruction\n{loaded.describe()}.")
        if config.norm_pix_loss:
            gr.Markdown(
                "This model predicts each removed patch normalised by its own mean and variance (norm_pix_loss): "
                "the reconstruction shows every predicted patch un-normalised with the mean and variance of the "
                "**original** patch, which the model did not see (as the official MAE demo does)."
            )
        for note in loaded.notes:
            gr.Markdown(f"**Warning from loading:** {note}")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image = gr.File(label="Image (PNG, JPEG, 16-bit PNG, TIFF, .npy)", file_types=IMAGE_FILE_TYPES,
                                type="filepath", elem_id="image-file")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image], label="Examples")
                mask_ratio = gr.Slider(0.0, 0.95, value=float(config.mask_ratio), step=0.05, label="Mask ratio",
                                       elem_id="mask-ratio")
                strategy = gr.Radio(list(MASK_STRATEGIES), label="Masking strategy", elem_id="mask-strategy",
                                    value=config.mask_strategy if config.mask_strategy in MASK_STRATEGIES else "random")
                seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                window = gr.Radio(list(WINDOWS), value="dataset range" if loaded.is_rgb8 else "image",
                                  label="Display window", elem_id="window")
                band_choices = list(range(channels))
                bands = [gr.Dropdown(band_choices, value=min(i, channels - 1), label=f"{colour} band",
                                     visible=multi_band, elem_id=f"band-{colour.lower()}")
                         for i, colour in enumerate(("Red", "Green", "Blue"))]
            with gr.Column(scale=3):
                with gr.Row():
                    panels = [gr.Image(label=PANEL_LABELS[key], type="numpy", format="png", interactive=False,
                                       elem_id=f"panel-{key}", min_width=160) for key in PANELS[:3]]
                with gr.Row():
                    panels += [gr.Image(label=PANEL_LABELS[key], type="numpy", format="png", interactive=False,
                                        elem_id=f"panel-{key}", min_width=160) for key in PANELS[3:]]
                    info = gr.Markdown(elem_id="info")
        inputs = [image, mask_ratio, strategy, seed, window, *bands]
        for control in inputs:
            control.change(run, inputs, [*panels, info], trigger_mode="always_last")
    return demo


def theme():
    """Gradio's default look with the system's fonts (the default theme fetches web fonts)."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo, host: str | None = None, port: int | None = None, **kwargs):
    """`demo.launch` offline: no share link, no server-side rendering (a Node process), the system fonts."""
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, theme=theme(), **kwargs)


def main(argv=None, default_model: str | None = None):
    """`python app.py --model ...`; a Space's app.py passes its own folder as `default_model`."""
    cfg = parse_config(AppConfig, argv, description=__doc__)
    model = cfg.model or default_model
    if not model:
        raise ValueError("--model is required: our export directory, a ViTMAE directory or Hub id, or an official .pth")
    import torch

    from modeling_mae.training.model_loading import checkpoint_options

    from .reconstruction import example_images, load_model

    import modeling_mae

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # on a shared machine fewer threads than cores can be faster
    loaded = load_model(model, crop_pct=cfg.crop_pct, **checkpoint_options(cfg))
    print(f"{loaded.describe()}; code: {os.path.dirname(modeling_mae.__file__)}", file=sys.stderr)
    for note in loaded.notes:
        print(f"warning: {note}", file=sys.stderr)
    examples = example_images(loaded, model, os.path.join(tempfile.gettempdir(), "modeling_mae_app_examples"))
    launch(build_demo(loaded, examples), cfg.host, cfg.port)
    return 0


def run(argv=None, default_model: str | None = None) -> int:
    """The command line's exit path (one-line errors)."""
    return run_main(lambda args: main(args, default_model), argv)
