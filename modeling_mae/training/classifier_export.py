"""The end of a fine-tuning or linear-probing run: the exported classifier (last and best), its model
card with the measured accuracy, `eval_results.json`, and the Hub push."""

from __future__ import annotations

import logging
from pathlib import Path


logger = logging.getLogger(__name__)

CLASSIFIER_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

`MAEForImageClassification` ({{ method }}) from the MAE encoder `{{ base_model }}`, trained with
`scripts/{{ script }}` of modeling_mae on **{{ dataset_name }}**.

## Results (measured by the training run)

| split | examples | top-1 | top-5 | loss |
|---|---|---|---|---|
| {{ eval_split }} | {{ num_examples }} | {{ top1 }} | {{ top5 }} | {{ loss }} |

Best top-1 at epoch {{ best_epoch }} of {{ epochs }}; {{ kept }}.

Per-class top-1 on {{ eval_split }}: {{ per_class }}.

## Data

{{ data_lines }}

| class | id | training images |
|---|---|---|
{{ class_rows }}

Images are preprocessed by the saved image processor (`MAEImageProcessor`: {{ decoding }}, shorter
side to {{ resize }} px, centre crop {{ crop }}, {{ statistics }}), the evaluation transform of the run.

## Use

```python
from transformers import pipeline

# trust_remote_code: the modeling code saved beside the weights (or `import modeling_mae` first)
classifier = pipeline("image-classification", model="{{ model_path }}", trust_remote_code=True)
{{ usage }}
```

## Training config

```yaml
{{ config_yaml }}```
"""


def pixel_card_values(image_processor) -> dict:
    """The card's words for the pixel format: decoding, statistics, and how to call the pipeline (8-bit
    RGB: files; other formats: numpy arrays in the data's dtype, since pipelines convert PIL images to RGB)."""
    from ..image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rgb = image_processor is None or image_processor.is_rgb8
    imagenet = rgb and (image_processor is None or (tuple(image_processor.image_mean) == IMAGENET_DEFAULT_MEAN
                                                    and tuple(image_processor.image_std) == IMAGENET_DEFAULT_STD))
    if rgb:
        statistics = "ImageNet mean / std" if imagenet else (
            f"mean {list(image_processor.image_mean)}, std {list(image_processor.image_std)}")
        return dict(decoding="EXIF orientation", statistics=statistics,
                    usage='classifier("cat.jpg")   # [{"label": ..., "score": ...}, ...]')
    low, high = image_processor.pixel_range
    return dict(
        decoding=f"{image_processor.num_channels} channel(s) of {image_processor.pixel_dtype} scaled from "
                 f"[{low:g}, {high:g}] to [0, 1]",
        statistics=f"mean {list(image_processor.image_mean)}, std {list(image_processor.image_std)}",
        usage=("# pipelines convert PIL images to 8-bit RGB: give the image as a numpy array in its own dtype\n"
               "import numpy as np\nfrom PIL import Image\n"
               'classifier(np.asarray(Image.open("scan.png")))   # or np.load("scene.npy"): (H, W) or (H, W, C)'),
    )


def dataset_display_name(dataset_name: str | None, train_dir: str | None) -> str:
    """The dataset's name for the card: the Hub id, or the local folder's name (the parent's when the
    training folder is called like a split: /data/pets/train -> pets)."""
    if dataset_name:
        path = Path(dataset_name)
        return path.resolve().name if path.exists() else dataset_name
    path = Path(train_dir).resolve()
    return path.parent.name if path.name.lower() in ("train", "training", "trn") and path.parent.name else path.name


def write_classifier_card(output_dir, *, model_path: str, model_name: str, base_model: str, dataset_name: str,
                          eval_split: str, results: dict, best_epoch: int, epochs: int, script: str, method: str,
                          config_yaml: str, kept: str, class_names: list[str], train_counts: list[int],
                          data_lines: list[str], image_size, crop_pct: float, image_processor=None) -> Path:
    """README.md with the measured top-1 / top-5 (also as `model-index` eval results), the classes and
    their training counts, what was skipped, and a `pipeline` snippet that works from any directory;
    `image_processor` (the exported one) says the pixel format (8-bit RGB with ImageNet's statistics when None)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..image_processing_mae import eval_resize_size

    metrics = [("accuracy", "top-1 accuracy", results["top1"])]
    if len(class_names) > 5:  # with 5 classes or fewer, "top-5" is every class: always 100 %
        metrics.append(("top_5_accuracy", "top-5 accuracy", results["top5"]))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["mae", "vision", "image-classification", "modeling_mae"],
        datasets=[dataset_name] if "/" in dataset_name and not Path(dataset_name).exists() else None,
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        model_name=model_name,
        eval_results=[
            EvalResult(task_type="image-classification", dataset_type=dataset_name, dataset_name=dataset_name,
                       dataset_split=eval_split, metric_type=kind, metric_name=name, metric_value=round(value, 3))
            for kind, name, value in metrics
        ],
    )
    per_class = results.get("per_class") or []
    per_class_text = ", ".join(
        f"{n} {100.0 * c / t:.1f}% ({c}/{t})" if t else f"{n} (no images)" for n, (c, t) in zip(class_names, per_class)
    ) or "not measured"
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    card = ModelCard.from_template(
        data, template_str=CLASSIFIER_CARD_TEMPLATE, model_name=model_name, base_model=base_model,
        dataset_name=dataset_name, eval_split=eval_split, num_examples=results["num_examples"],
        top1=f"{results['top1']:.2f}%",
        top5=f"{results['top5']:.2f}%" if len(class_names) > 5 else f"- ({len(class_names)} classes)", loss=f"{results['loss']:.4f}",
        best_epoch=best_epoch, epochs=epochs, model_path=model_path, script=script, method=method,
        config_yaml=config_yaml, kept=kept, per_class=per_class_text,
        data_lines="\n".join(f"- {line}" for line in data_lines),
        class_rows="\n".join(f"| {n} | {i} | {c} |" for i, (n, c) in enumerate(zip(class_names, train_counts))),
        resize=eval_resize_size((height, width), crop_pct), crop=f"{height}x{width}",
        **pixel_card_values(image_processor),
    )
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def data_summary(cfg, splits, state: dict, warnings: list[str]) -> list[str]:
    """The card's data lines: where the splits came from, their sizes, the unreadable images skipped,
    the class-balance warnings."""
    source = cfg.dataset_name or cfg.train_dir
    val_source = cfg.validation_dir or cfg.dataset_name
    last = state["history"][-1] if state["history"] else {}
    lines = [
        f"training set: {len(splits.train)} images in {len(splits.class_names)} classes "
        f"(`{source}`{', split ' + cfg.train_split if cfg.dataset_name else ''})",
        f"validation set: {len(splits.validation)} images (`{val_source}`"
        f"{', split ' + cfg.validation_split if cfg.dataset_name and not cfg.validation_dir else ''})",
        f"unreadable images skipped: {len(state.get('unreadable_train') or [])} in training, "
        f"{last.get('num_unreadable', 0)} in validation (limit: max_corrupt_fraction="
        f"{getattr(cfg, 'max_corrupt_fraction', None)})",
    ]
    return lines + [f"warning: {w}" for w in warnings]


def finish_classifier_run(accelerator, model, cfg, state: dict, script: str, method: str, splits=None,
                          image_processor=None, data_warnings: list[str] | None = None) -> int:
    """After training: the last model in `output_dir` (best one already in `output_dir/best`), both
    with `id2label`, the evaluation transform as image processor, and a model card of their measured
    accuracy and data, `eval_results.json`, and the Hub push.
    Returns the exit code (1 when the push failed; the local output is complete either way)."""
    import json

    from .config import to_yaml
    from .export import HubPushError, export_model, push_to_hub

    full_state_dict = accelerator.get_state_dict(model)  # a collective: every process
    accelerator.wait_for_everyone()
    exit_code = 0
    if accelerator.is_main_process:
        last = state["history"][-1]
        best = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
        unwrapped = accelerator.unwrap_model(model)
        output = export_model(unwrapped, cfg.output_dir, image_processor=image_processor, state_dict=full_state_dict)
        summary = {"last": last, "best": best, "history": state["history"], "per_class": state.get("per_class", {}),
                   "unreadable_train": state.get("unreadable_train", [])}
        if splits is not None:
            summary["class_names"] = list(splits.class_names)
            summary["train_counts"] = list(splits.train_counts or [])
        (output / "eval_results.json").write_text(json.dumps(summary, indent=2))
        names = list(splits.class_names) if splits is not None else [unwrapped.config.id2label[i]
                                                                      for i in range(unwrapped.config.num_labels)]
        counts = list(splits.train_counts) if splits is not None and splits.train_counts else [0] * len(names)
        card = dict(
            model_name=cfg.hub_model_id or Path(cfg.output_dir).name, base_model=cfg.model_name_or_path,
            dataset_name=dataset_display_name(cfg.dataset_name, cfg.train_dir), eval_split=cfg.validation_split,
            best_epoch=state["best_epoch"], epochs=cfg.num_train_epochs, script=script, method=method,
            config_yaml=to_yaml(cfg), class_names=names, train_counts=counts,
            data_lines=data_summary(cfg, splits, state, data_warnings or []) if splits is not None else [],
            image_size=unwrapped.config.image_hw, crop_pct=getattr(cfg, "eval_crop_pct", 0.875),
            image_processor=image_processor,
        )
        where = cfg.hub_model_id or str(Path(cfg.output_dir).resolve())
        per_class = state.get("per_class", {})
        write_classifier_card(output, model_path=where, results={**last, "per_class": per_class.get(str(last["epoch"]))},
                              kept="this directory holds the last epoch's model, the best one is in `best/`", **card)
        if (output / "best").is_dir():
            write_classifier_card(output / "best", model_path=where if cfg.hub_model_id else f"{where}/best",
                                  results={**best, "per_class": per_class.get(str(best["epoch"]))},
                                  kept="this directory holds the best epoch's model", **card)
        logger.info("last epoch: top-1 %.2f%%, best: top-1 %.2f%% (epoch %d); exported to %s",
                    last["top1"], best["top1"], state["best_epoch"], output)
        if cfg.push_to_hub:
            try:
                url = push_to_hub(output, cfg.hub_model_id, cfg.hub_include_checkpoints, cfg.hub_private_repo,
                                  cfg.hub_token, commit_message=f"MAE {method}: top-1 {last['top1']:.2f}%")
                logger.info("pushed to %s", url)
            except HubPushError as err:
                logger.error("%s", err)
                exit_code = 1
    accelerator.wait_for_everyone()
    return exit_code
