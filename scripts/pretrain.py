"""Pretrain a masked autoencoder (MAE) with an explicit Accelerate loop over streamed images.

    accelerate launch scripts/pretrain.py --config configs/pretrain/vit_base_patch16.yaml [--flag value ...]
    python scripts/pretrain.py --config configs/pretrain/demo.yaml                # tiny CPU demo

One typed config (`PretrainConfig`: YAML + command-line overrides, flag names as in transformers'
`*_no_trainer` examples), printed at start and saved with every checkpoint. The loop, top to bottom:

    data      load_source -> split_for_process -> ImageStream (decode, RandomResizedCrop + flip, uint8)
              -> DataLoader workers; normalised on the device. Each process already streams its own
              shards (`split_dataset_by_node`), so the DataLoader does not go through
              `accelerator.prepare`, and `dispatch_batches=False` is set explicitly all the same
    schedule  lr = blr x effective batch / 256; warm-up then half-cycle cosine per optimizer step
    step      the shared loop (`training/loop.py::TrainingLoop`): `gradient_accumulation_steps` micro-batches
              under accelerate's accumulation, loss in fp32, optional clipping, NaN/inf steps skipped and
              counted (`NonFiniteGuard`), optimizer + schedule step; this script supplies the stream's
              micro-batches and the MAE loss (`PretrainRun`)
    observe   tqdm (step, loss, lr, img/s), trackers (loss, lr, img/s, MFU, data-wait fraction),
              reconstruction grid PNG every `reconstruction_steps`
    persist   atomic checkpoints every `checkpointing_steps` (keep the last `checkpoints_total_limit`) and at
              the end, exact resume (`--resume_from_checkpoint latest|PATH`: the stream continues where each
              process stood), export + model card, `--push_to_hub`
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import MODEL_PRESETS
from modeling_mae_cli.run_config import RunConfig, script_defaults


@dataclass(frozen=True)
@script_defaults(output_dir="outputs/mae-pretrain", checkpointing_steps=1000, checkpoints_total_limit=3, logging_steps=10)
class PretrainConfig(RunConfig):
    """MAE pretraining (defaults: the official ViT-B/16 ImageNet-1k recipe, He et al. 2021, A.1).

    Shared with every training script (`RunConfig`): the step (batch, accumulation, clipping, precision,
    compile, seed), checkpoints, logging and the Hub."""

    # ---- data ------------------------------------------------------------------------------------
    dataset_name: Optional[str] = option("ILSVRC/imagenet-1k", help="Hub dataset (parquet or webdataset layout)")
    dataset_config_name: Optional[str] = option(None, help="configuration name of the Hub dataset")
    train_dir: Optional[str] = option(
        None, help="local folder of parquet files, webdataset .tar shards or images; replaces dataset_name")
    train_split: str = option("train", help="split of the dataset to train on")
    image_column: Optional[str] = option(None, help="image column; detected when unset (image, jpg, ...)")
    label_column: Optional[str] = option(None, help="label column; detected when unset; unused by pretraining")
    num_train_examples: Optional[int] = option(None, help="epoch length when the dataset does not tell")
    shuffle_buffer_size: int = option(2000, help="examples per shuffle window of the stream")
    dataloader_num_workers: int = option(8, help="DataLoader worker processes per training process")
    create_demo_data: bool = option(False, help="no data named: train on scikit-image crops written once into outputs/demo_data")
    # ---- pixels: channels, bit depth and statistics from the data (pixels.py) --------------------------
    num_channels: Optional[int] = option(None, help="image channels; default: what the data has (its first images)")
    pixel_range: Optional[list[float]] = option(
        None, help="low,high -> [0, 1] for the whole dataset; default: the bit depth")
    image_mean: Optional[list[str]] = option(
        None, help="per channel, or auto; default: ImageNet's for RGB, auto otherwise")
    image_std: Optional[list[str]] = option(None, help="per channel, or auto (with image_mean)")
    image_stats_num_samples: int = option(256, help="images read by the auto statistics pass")
    adapt_channels: bool = option(True, help="adapt a checkpoint of another channel count (patch projection, pixel head)")
    # ---- model -----------------------------------------------------------------------------------
    model_preset: str = option("mae-vit-base-patch16", help="architecture of a new model", choices=MODEL_PRESETS)
    model_name_or_path: Optional[str] = option(
        None, help="start from any MAE: our directory / Hub id, official .pth, ViTMAE, timm", hub_or_path=True)
    model_config: dict = option({}, help="MAEConfig overrides, e.g. '{drop_path_rate: 0.1}'")
    # MAEConfig settings; unset (none): the checkpoint's for continued pretraining, else MAEConfig's (the paper's)
    mask_ratio: Optional[float] = option(
        None, help="fraction of patches removed, in [0, 1); none: the checkpoint's, else 0.75")
    norm_pix_loss: Optional[bool] = option(
        None, help="loss on per-patch normalised pixels (the paper's better target); none: the checkpoint's, else true")
    # ---- augmentation ----------------------------------------------------------------------------
    crop_scale: list[float] = option([0.2, 1.0], help="RandomResizedCrop area range min,max")
    hflip: float = option(0.5, help="probability of a horizontal flip")
    # ---- optimization ----------------------------------------------------------------------------
    blr: float = option(1.5e-4, help="base learning rate: lr = blr x effective batch / 256")
    learning_rate: Optional[float] = option(None, help="absolute learning rate; when set, blr is not used")
    min_lr: float = option(0.0, help="learning rate at the end of the cosine schedule")
    weight_decay: float = option(
        0.05, help="AdamW weight decay on the weights and the CLS / mask tokens (as the official code); "
                   "not on biases and norms (1-D); the position tables are frozen")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.95, help="AdamW beta2")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon")
    num_train_epochs: float = option(800, help="epochs to train (with the warm-up)")
    max_train_steps: Optional[int] = option(None, help="optimizer steps to train; overrides num_train_epochs")
    num_warmup_epochs: float = option(40, help="epochs of linear learning-rate warm-up")
    num_warmup_steps: Optional[int] = option(None, help="warm-up in optimizer steps; overrides num_warmup_epochs")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass (less memory)")
    max_consecutive_nonfinite: int = option(10, help="stop after this many NaN/inf optimizer steps in a row")
    num_threads: Optional[int] = option(None, help="intra-op CPU threads per process (torch.set_num_threads)")
    # ---- is it learning? k-NN evaluation during pretraining (labelled images) -----------------------
    eval_steps: Optional[int] = option(
        None, help="k-NN evaluation every N optimizer steps and at step 0; none: no evaluation")
    eval_dataset_name: Optional[str] = option(
        None, help="labelled Hub dataset of the evaluation; default: the training data (its labelled splits)")
    eval_train_dir: Optional[str] = option(None, help="local labelled folder of the memory bank (any layout)")
    eval_dir: Optional[str] = option(None, help="local labelled folder of the queries (held-out images)")
    eval_train_split: str = option("train", help="split of the memory bank")
    eval_split: str = option("validation", help="split of the queries")
    eval_label_column: Optional[str] = option(None, help="label column of the evaluation data; detected when unset")
    eval_bank_size: int = option(10000, help="memory-bank images (drawn at random with the seed)")
    eval_num_queries: int = option(2000, help="query images (drawn at random with the seed)")
    knn_k: int = option(20, help="neighbours that vote (DINO's k-NN protocol)")
    knn_temperature: float = option(0.07, help="temperature of the votes exp(cosine / T)")
    online_probe: bool = option(False, help="also fit a BatchNorm + Linear probe on the bank's detached features at each evaluation")
    per_device_eval_batch_size: int = option(256, help="images per forward of the evaluation")
    # ---- what the user sees ----------------------------------------------------------------------
    reconstruction_steps: Optional[int] = option(1000, help="write a reconstruction grid PNG every N steps")
    num_reconstruction_images: int = option(8, help="images in the reconstruction grid")
    peak_tflops: Optional[float] = option(None, help="peak TFLOP/s per device for MFU; known GPUs are looked up")
    log_sample_ids: bool = option(False, help="write the ids of the consumed samples to OUTPUT_DIR/sample_ids/")
    write_space_files: bool = option(
        False, help="make output_dir a Gradio Space too: app.py, requirements.txt, Space card fields (README)")

    def __post_init__(self):
        super().__post_init__()
        if self.train_dir is None and self.dataset_name is None and not self.create_demo_data:
            raise ValueError("set `dataset_name` (a Hub dataset) or `train_dir` (a local folder); both are None")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` must be in [0, 1), got {self.mask_ratio}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"`crop_scale` must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (user/name), got None")
        parse_statistics(self.image_mean, self.image_std)  # raises on malformed values
        if self.image_stats_num_samples < 1:
            raise ValueError(f"`image_stats_num_samples` must be >= 1, got {self.image_stats_num_samples}")
        for name in ("eval_steps", "eval_bank_size", "eval_num_queries", "knn_k", "per_device_eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.knn_temperature <= 0:
            raise ValueError(f"`knn_temperature` must be > 0, got {self.knn_temperature}")


PROBE_IMAGES = 8  # images read to find the data's channel count and bit depth


def parse_statistics(image_mean, image_std) -> Optional[tuple]:
    """None (the default), "auto", or (mean floats, std floats) of equal length."""
    if image_mean is None and image_std is None:
        return None
    is_auto = [v is not None and [str(x).lower() for x in v] == ["auto"] for v in (image_mean, image_std)]
    if all(is_auto):
        return "auto"
    if any(is_auto) or image_mean is None or image_std is None:
        raise ValueError(f"`image_mean` and `image_std` must both be values or both `auto`, got {image_mean} and {image_std}")
    try:
        mean, std = [float(x) for x in image_mean], [float(x) for x in image_std]
    except ValueError:
        raise ValueError(f"`image_mean` / `image_std` must be numbers per channel or `auto`, got {image_mean} / {image_std}") from None
    if len(mean) != len(std):
        raise ValueError(f"`image_mean` has {len(mean)} values but `image_std` has {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"`image_std` values must be > 0, got {std}")
    return mean, std


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(PretrainConfig, description=__doc__)

import torch  # noqa: E402
from accelerate.utils import DistributedType, set_seed  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from modeling_mae import MAEConfig, MAEForPreTraining  # noqa: E402
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.data import (  # noqa: E402
    ImageStream,
    StreamTracker,
    count_examples,
    detect_local_format,  # noqa: E402
    first_image_cells,
    load_source,
    make_dataloader,
    split_for_process,
    write_demo_dataset,
)
from modeling_mae.training.demo_data import demo_data_dirs, ensure_demo_data  # noqa: E402
from modeling_mae.training.export import (  # noqa: E402
    HubPushError,
    check_hub_access,
    export_model,
    pixel_format_image_processor,
    push_to_hub,
    write_model_card,
    write_space_files,
)
from modeling_mae.training.knn import load_knn_sets  # noqa: E402
from modeling_mae.training.pretraining_evaluation import PretrainingMonitor, batch_signals, collapse_warning  # noqa: E402
from modeling_mae.training.run_history import RunHistory, plot_training_curves  # noqa: E402
from modeling_mae.training.visualization import reconstructions_over_time  # noqa: E402
from modeling_mae.training.loop import TrainingLoop, compile_model, restore, start_run, start_trackers  # noqa: E402
from modeling_mae.training.model_loading import (  # noqa: E402
    adapt_num_channels,  # noqa: E402
    checkpoint_options,
    load_pretrained,
    merge_model_config,
)
from modeling_mae.training.optim import (  # noqa: E402
    create_optimizer,
    create_scheduler,
    effective_batch_size,
    pretraining_param_groups,
    scaled_lr,
    steps_for_epochs,
)
from modeling_mae.training.pixels import (  # noqa: E402
    ArrayTrainTransform,
    PixelFormat,
    PixelFormatError,
    channel_statistics,
    probe_pixel_format,
)
from modeling_mae.training.runtime import (  # noqa: E402
    GracefulStop,
    NonFiniteGuard,
    NonFiniteLossError,
    SpeedMeter,
    autocast_dtype,
    flops_per_image,
    make_accelerator,
    peak_flops,
    resume_command,
)
from modeling_mae.training.transforms import (  # noqa: E402
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TrainTransform,
    normalize_on_device,
)


logger = logging.getLogger("pretrain")

DEMO_DATA_DIR = "outputs/demo_data"  # create_demo_data: scikit-image crops, written here once


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def build_model(cfg: PretrainConfig, num_channels: int = 3) -> MAEForPreTraining:
    """A preset (with the data's channel count), or any published MAE converted on the fly (`load_pretrained`:
    an encoder-only release gets a new decoder, logged loudly), adapted to the data's channel count.
    `model_config` and the fields for MAEConfig settings override the preset's / checkpoint's config; a
    setting given both ways is refused (`merge_model_config`)."""
    if "num_channels" in cfg.model_config:
        raise ValueError(
            f"`model_config` sets num_channels={cfg.model_config['num_channels']!r}; the channel count is the data's "
            f"or the field `num_channels`'s: set that field"
        )
    fields = {"mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss, **checkpoint_options(cfg)}
    overrides = merge_model_config(cfg.model_config, fields)
    if cfg.model_name_or_path:
        model = load_pretrained(MAEForPreTraining, cfg.model_name_or_path, **overrides)
    else:
        model = MAEForPreTraining(MAEConfig.from_preset(cfg.model_preset, **{**overrides, "num_channels": num_channels}))
    origin = "the checkpoint's" if cfg.model_name_or_path else "the preset's"
    logger.info("loss settings: mask_ratio %s (%s), norm_pix_loss %s (%s)",
                model.config.mask_ratio, "set" if "mask_ratio" in overrides else origin,
                model.config.norm_pix_loss, "set" if "norm_pix_loss" in overrides else origin)
    if model.config.num_channels != num_channels:
        if not cfg.adapt_channels:
            raise PixelFormatError(
                f"the model has num_channels={model.config.num_channels} but the data has {num_channels} channel(s); "
                f"set `adapt_channels` true to adapt the checkpoint"
            )
        model, message = adapt_num_channels(model, num_channels)
        logger.warning("%s", message)
    return model


def train_source(cfg: PretrainConfig):
    """The training split, not yet split between processes (a Hub dataset or the local folder)."""
    return load_source(
        dataset_name=None if cfg.train_dir else cfg.dataset_name,
        dataset_config_name=cfg.dataset_config_name,
        train_dir=cfg.train_dir,
        split=cfg.train_split,
        token=cfg.hub_token,
        seed=cfg.seed,  # a local folder's file order: drawn from (seed, epoch), the same on every process
    )


def probe_data(cfg: PretrainConfig):
    """The data's pixel format (channels, dtype, range) from its first images, and the raw (unsplit) source."""
    source = train_source(cfg)
    cells, names = first_image_cells(source, PROBE_IMAGES, cfg.image_column)
    return probe_pixel_format(cells, cfg.pixel_range, names, cfg.num_channels), source


def image_statistics(cfg: PretrainConfig, fmt: PixelFormat, source, show_progress: bool) -> tuple[list, list, str]:
    """(mean, std, where they come from): given values, ImageNet's for RGB, or computed (`auto`, the
    default for non-RGB data) over the first `image_stats_num_samples` images, the same on every process."""
    given = parse_statistics(cfg.image_mean, cfg.image_std)
    if given is None and fmt.is_rgb8:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD), "ImageNet's"
    if given is None or given == "auto":
        cells, names = first_image_cells(source, cfg.image_stats_num_samples, cfg.image_column)
        skipped = []
        mean, std = channel_statistics(cells, fmt, total=len(cells), progress=show_progress, names=names, skipped=skipped)
        return mean, std, f"computed over {len(cells) - len(skipped)} images" + (
            f", {len(skipped)} undecodable one(s) skipped" if skipped else "")
    mean, std = given
    if len(mean) != fmt.num_channels:
        raise ValueError(
            f"`image_mean` / `image_std` have {len(mean)} values but the data has {fmt.num_channels} channel(s)"
        )
    return mean, std, "given"


def build_stream(cfg: PretrainConfig, accelerator, image_size, pixel_format: Optional[PixelFormat] = None) -> ImageStream:
    source = split_for_process(train_source(cfg), accelerator.process_index, accelerator.num_processes, cfg.dataloader_num_workers)
    if pixel_format is None or pixel_format.is_rgb8:  # photographs: the uint8 fast path
        transform = TrainTransform(image_size, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    else:
        transform = ArrayTrainTransform(image_size, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    return ImageStream(
        source,
        transform,
        batch_size=cfg.per_device_train_batch_size,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        shuffle_window=cfg.shuffle_buffer_size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        drop_last=True,
        pixel_format=pixel_format,
    )


def build_monitor(cfg: PretrainConfig, accelerator, image_size, pixel_format, stats) -> Optional[PretrainingMonitor]:
    """The k-NN evaluation's fixed labelled sets (`eval_steps` set): the memory bank (`eval_train_dir` /
    `eval_dataset_name` / the training data, split `eval_train_split`) and the held-out queries (`eval_dir` /
    `eval_dataset_name` / the training data, split `eval_split`), decoded once with the evaluation
    transform of the training pixels, each process its share."""
    if cfg.eval_steps is None:
        return None
    training = cfg.train_dir or cfg.dataset_name
    bank = (cfg.eval_train_dir or cfg.eval_dataset_name or training, cfg.eval_train_split)
    queries = (cfg.eval_dir or cfg.eval_dataset_name or training, cfg.eval_split)
    with accelerator.main_process_first():  # a Hub dataset is read (and cached) once
        bank_set, query_set, classes = load_knn_sets(
            bank, queries, cfg.eval_bank_size, cfg.eval_num_queries, image_size, pixel_format, seed=cfg.seed,
            rank=accelerator.process_index, world_size=accelerator.num_processes, label_column=cfg.eval_label_column,
            dataset_config_name=cfg.dataset_config_name if not cfg.eval_dataset_name else None, token=cfg.hub_token)
    logger.info(
        "k-NN evaluation at step 0 and every %d steps: memory bank %d images (%s, split %r), queries %d (%s, split "
        "%r), %d classes; k %d, T %g (DINO's protocol), CLS and mean-pooled features of the unmasked encoder",
        cfg.eval_steps, bank_set.total, bank[0], bank[1], query_set.total, queries[0], queries[1], len(classes),
        cfg.knn_k, cfg.knn_temperature)
    mean, std = stats[:2]
    return PretrainingMonitor(
        bank_set, query_set, lambda images: normalize_on_device(images, mean, std), device=accelerator.device,
        dtype=autocast_dtype(accelerator.mixed_precision), accelerator=accelerator,
        batch_size=cfg.per_device_eval_batch_size, k=cfg.knn_k, temperature=cfg.knn_temperature,
        online_probe=cfg.online_probe, seed=cfg.seed)


def log_pictures(accelerator, cfg: PretrainConfig, step: int, pictures: dict) -> None:
    """PNG files into TensorBoard's images (when it is a tracker of the run)."""
    if not (cfg.with_tracking and cfg.report_to in ("tensorboard", "all")):
        return
    import numpy as np
    from PIL import Image

    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:  # "all" without tensorboard installed
        return
    for tag, path in pictures.items():
        if path is not None and hasattr(writer, "add_image"):
            writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


def knn_card_values(history: RunHistory) -> dict:
    """The model card's "Is it learning?" values: k-NN (and probe) at the first and the last evaluation, the
    final loss as a share of the trivial predictor's."""
    rows, first_step, last_step = [], None, None
    for name, label in (("knn/cls_top1", "k-NN top-1, CLS token"), ("knn/mean_top1", "k-NN top-1, mean-pooled"),
                        ("knn/cls_top5", "k-NN top-5, CLS token"), ("probe/top1", "online probe top-1 (CLS)")):
        ends = history.first_and_last(name)
        if ends:
            (first_step, first), (last_step, last) = ends
            rows.append(f"| {label} | {first:.2f} % | {last:.2f} % |")
    ratio = history.first_and_last("train/loss_vs_trivial")
    return {
        "knn_table": "\n".join(rows) or None, "knn_first_step": first_step, "knn_last_step": last_step,
        "loss_vs_trivial": f"{100 * ratio[1][1]:.0f} %" if ratio else None,
    }


def schedule_lengths(cfg: PretrainConfig, effective_batch: int, num_examples: Optional[int]) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) from epochs or explicit step counts."""
    steps_per_epoch = num_examples // effective_batch if num_examples else None
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset has {num_examples} examples, fewer than one effective batch of {effective_batch}"
        )
    if cfg.max_train_steps is None and steps_per_epoch is None:
        raise ValueError(
            "the number of training examples is unknown for this stream: set `num_train_examples` or `max_train_steps`"
        )
    total = cfg.max_train_steps or steps_for_epochs(cfg.num_train_epochs, steps_per_epoch)
    if cfg.num_warmup_steps is not None:
        warmup = cfg.num_warmup_steps
    elif steps_per_epoch is not None:
        warmup = steps_for_epochs(cfg.num_warmup_epochs, steps_per_epoch)
    else:
        raise ValueError("set `num_warmup_steps` (the epoch length is unknown, so `num_warmup_epochs` cannot be used)")
    return total, min(warmup, total)


def next_micro_batches(batches, count: int, tracker: StreamTracker, accelerator) -> Optional[list[dict]]:
    """`count` consumed batches of this process, or None on every process as soon as one process's
    stream is exhausted (so no process waits for a gradient sync that never comes)."""
    taken = []
    while len(taken) < count:
        try:
            batch = next(batches)
        except StopIteration:
            break
        if batch.get("placeholder"):
            continue
        taken.append(batch)
    if accelerator.num_processes == 1:  # no collective, no wait on the device
        if len(taken) < count:
            return None
    else:
        have = torch.tensor([1.0 if len(taken) == count else 0.0], device=accelerator.device)
        if accelerator.gather(have).min().item() < 1.0:
            return None
    for batch in taken:
        tracker.update(batch)
    return taken


@torch.no_grad()
def write_reconstruction(model, images: torch.Tensor, path: Path, seed: int,
                         stats=(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), save: bool = True) -> Path | None:
    """Reconstruction grid PNG of uint8 or dataset-scaled float images; its own RNG, so the training RNG
    (masks) is untouched. Under FSDP a forward gathers the shards (a collective): every process calls
    this and only `save` writes."""
    from modeling_mae.training.visualization import reconstruction_grid

    mean, std = stats
    with torch.random.fork_rng(devices=[]):
        image = reconstruction_grid(model, normalize_on_device(images, mean, std), seed=seed, mean=mean, std=std)
    if not save:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


@torch.no_grad()
def param_checksum(model) -> list[float]:
    """(sum, sum of squares) of all parameters in float64: a cheap fingerprint to compare replicas.

    Under FSDP a parameter is a DTensor shard: its sums are reduced over the processes (a collective,
    every process calls this), so the fingerprint is that of the whole model there too."""
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for param in model.parameters():
        p = param.detach().double()
        sums = [p.sum(), p.square().sum()]
        total += torch.stack([s.full_tensor() if hasattr(s, "full_tensor") else s for s in sums])
    return total.tolist()


class SampleLog:
    """Ids of the samples consumed by this process, one `step<TAB>id` line each (for checks of exact
    resume); truncated back to the resumed step so a crashed tail is not counted twice."""

    def __init__(self, output_dir: str, rank: int, enabled: bool):
        self.path = Path(output_dir) / "sample_ids" / f"rank{rank}.txt"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if int(line.split("\t", 1)[0]) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, micro_batches: list[dict]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for batch in micro_batches:
                f.writelines(f"{step}\t{sid}\n" for sid in batch["sample_ids"])


class PretrainRun:
    """What pretraining keeps around the shared loop (`TrainingLoop`): the trainer state, the exact
    position of every process's stream (`StreamTracker`), the NaN/inf guard, the speed meter, the
    sample-id log and the reconstruction preview, and the hooks the loop calls.

    `state` (trainer_state.json): step, epoch, samples seen, last logged loss."""

    def __init__(self, accelerator, cfg: PretrainConfig, checkpoints, model, scheduler, stream, loader, stats,
                 model_config, config_yaml: str):
        self.accelerator, self.cfg, self.checkpoints = accelerator, cfg, checkpoints
        self.model, self.scheduler, self.stream, self.loader, self.stats = model, scheduler, stream, loader, stats
        self.config_yaml = config_yaml
        self.state = {"step": 0, "epoch": 0, "samples_seen": 0, "last_loss": float("nan")}
        self.guard = NonFiniteGuard(cfg.max_consecutive_nonfinite)
        self.tracker = StreamTracker(num_workers=cfg.dataloader_num_workers)
        self.corrupt_images = 0  # this process's count
        self.stream_state = None  # the resumed position of this process's stream
        self.sample_log = SampleLog(cfg.output_dir, accelerator.process_index, cfg.log_sample_ids)
        peak = peak_flops(accelerator.device, cfg.peak_tflops, autocast_dtype(accelerator.mixed_precision))
        self.meter = SpeedMeter(flops_per_image(model_config, model_config.mask_ratio),
                                peak * accelerator.num_processes if peak else None)
        self.preview = None  # the first images, for the reconstruction pictures
        self.last_micro = None  # the latest micro-batch's (normalised pixels, mask, loss): the learning signals
        self.monitor, self.history = None, RunHistory(cfg.output_dir, enabled=accelerator.is_main_process)
        self.sharded = accelerator.distributed_type == DistributedType.FSDP  # a forward is a collective there
        # test hook, kept out of --help: MAE_CRASH_AT_STEP=N kills the process (SIGKILL) right after optimizer
        # step N, so that the tests can resume from what a crash leaves behind
        self.crash_at = int(os.environ.get("MAE_CRASH_AT_STEP", "-1"))

    # ---- persist ---------------------------------------------------------------------------------
    def restore(self, resume_path: Optional[Path], total_steps: int) -> None:
        process_state = restore(self.accelerator, self.checkpoints, resume_path, self.state)
        if resume_path is not None:
            self.guard.load_state_dict(self.state.get("nonfinite", {}))
            self.corrupt_images = int(process_state.get("corrupt_images", 0))
            self.stream_state = process_state.get("stream")
            if self.state["step"] >= total_steps:
                logger.info("the run is already finished (step %d of %d): nothing to train, exporting again",
                            self.state["step"], total_steps)
        elif self.cfg.resume_from_checkpoint:
            logger.info("no checkpoint in %s yet: starting from scratch", self.checkpoints.root)
        self.sample_log.truncate_after(self.state["step"])

    def tell_the_story(self, monitor: Optional[PretrainingMonitor], resume_path: Optional[Path]) -> None:
        """The k-NN evaluation (None: off) and history.jsonl: a resumed run keeps its story up to its
        checkpoint, a fresh run starts a fresh one."""
        self.monitor = monitor
        self.history.truncate(self.state["step"] if resume_path is not None else -1)

    def save(self) -> Path:
        trainer_state = {**self.state, "nonfinite": self.guard.state_dict(), "lr": self.scheduler.get_last_lr()[0]}
        process_state = {
            "stream": self.tracker.state_dict(),
            "corrupt_images": self.corrupt_images,
            "param_checksum": param_checksum(self.model),  # equal on every process unless replicas diverged
        }
        path = self.checkpoints.save(self.accelerator, self.state["step"], trainer_state, process_state,
                                     self.config_yaml)
        logger.info("saved checkpoint %s", path)
        return path

    # ---- the loop's hooks ------------------------------------------------------------------------
    def micro_batches(self, epoch: int, skip: int):
        """This epoch's stream from where it stands (a resumed one continues at its saved position, so
        nothing is skipped here), `gradient_accumulation_steps` batches at a time, until any process's
        stream runs out."""
        state, stream, tracker = self.state, self.stream, self.tracker
        stream.set_epoch(state["epoch"])
        resumed_mid_epoch = self.stream_state is not None and int(self.stream_state["epoch"]) == state["epoch"]
        if resumed_mid_epoch:
            stream.resume(self.stream_state)
            tracker.load_state_dict(self.stream_state)
        else:
            stream.resume(None)
            tracker.start_epoch(state["epoch"])
        self.stream_state = None
        batches, steps = iter(self.loader), 0
        while True:
            wait_start = time.perf_counter()
            micro = next_micro_batches(batches, self.cfg.gradient_accumulation_steps, tracker, self.accelerator)
            data_wait = time.perf_counter() - wait_start
            if micro is None:
                break  # end of this epoch's stream (on some process)
            steps += 1
            if self.preview is None:
                self.preview = micro[0]["pixel_values"][: self.cfg.num_reconstruction_images].clone()
            self.corrupt_images += sum(int(b["num_skipped"]) for b in micro)
            images = sum(len(b["pixel_values"]) for b in micro) * self.accelerator.num_processes
            state["samples_seen"] += images
            self.sample_log.write(state["step"] + 1, micro)
            self.meter.add(images, data_wait)
            yield from micro
        if steps == 0 and not resumed_mid_epoch:
            raise ValueError(
                "the data stream yields no full batch on some process: check `train_dir` / `dataset_name`, "
                "`per_device_train_batch_size` and the number of shards per process"
            )

    def loss_of(self, batch: dict) -> torch.Tensor:
        """uint8 (or dataset-scaled) images -> normalised on the device -> the MAE loss (fp32)."""
        self.model.train()
        pixel_values = batch["pixel_values"].to(self.accelerator.device, non_blocking=True)
        pixel_values = normalize_on_device(pixel_values, *self.stats[:2])
        # the loss needs predictions for the removed patches only: skip the decoder work for the rest
        out = self.model(pixel_values=pixel_values, predict_masked_only=True)
        self.last_micro = (pixel_values, out.mask.detach(), out.loss.detach())  # for the signals of a logging step
        return out.loss  # fp32 (forward_loss upcasts)

    def evaluate(self, step: int) -> None:
        """k-NN (and probe) of the unmasked encoder now: logged, tracked, kept in the history. Every process
        takes part (its share of the sets; FSDP gathers the shards); the training RNG is not touched."""
        start = time.perf_counter()
        results = self.monitor.evaluate(self.accelerator.unwrap_model(self.model).mae)
        results["eval/seconds"] = time.perf_counter() - start
        self.history.append(step, results)
        if self.cfg.with_tracking:
            self.accelerator.log(results, step=step)
        top5 = f", top-5 {results['knn/cls_top5']:.2f} %" if "knn/cls_top5" in results else ""
        probe = f"; online probe {results['probe/top1']:.2f} %" if "probe/top1" in results else ""
        logger.info("step %d: k-NN top-1 %.2f %% (CLS%s), %.2f %% (mean-pooled)%s [%.1f s]", step,
                    results["knn/cls_top1"], top5, results["knn/mean_top1"], probe, results["eval/seconds"])

    def end_of_epoch(self, epoch: int) -> None:
        self.state["epoch"] += 1

    def on_log(self, step: int, logs: dict) -> None:
        self.state["last_loss"] = logs["train/loss"]
        speed = self.meter.read()
        self.meter.reset()
        logs.update({
            "train/images_per_s": speed["images_per_s"],
            "train/data_wait_fraction": speed["data_wait_fraction"],
            "train/epoch": self.state["epoch"],
            "train/skipped_nonfinite_steps": self.guard.skipped,
            "data/corrupt_images_skipped": self.corrupt_images_total(),
        })
        if "mfu" in speed:
            logs["train/mfu"] = speed["mfu"]
        # no labels needed: the loss against the blind guess on the same patches, feature collapse
        signals = batch_signals(self.accelerator.unwrap_model(self.model), *self.last_micro)
        logs.update(signals)
        warning = collapse_warning(signals)
        if warning and self.accelerator.is_main_process:
            logger.warning("step %d: %s", step, warning)
        self.history.append(step, logs)
        if self.accelerator.is_main_process and not sys.stderr.isatty():
            logger.info("step %d: %s", step, json.dumps({k: round(v, 6) for k, v in logs.items()}))

    def on_step_end(self, step: int) -> None:
        """The reconstruction picture every `reconstruction_steps`; the crash test hook."""
        cfg, is_main = self.cfg, self.accelerator.is_main_process
        if cfg.reconstruction_steps and step % cfg.reconstruction_steps == 0 and (is_main or self.sharded):
            png = Path(cfg.output_dir) / "reconstructions" / f"step_{step}.png"
            write_reconstruction(self.model, self.preview, png, cfg.seed, self.stats[:2], save=is_main)
            if is_main:
                log_pictures(self.accelerator, cfg, step, {"reconstruction": png})
        if step == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook (see __init__)

    def corrupt_images_total(self) -> int:
        """Undecodable images skipped by all processes (a collective)."""
        return int(self.accelerator.reduce(torch.tensor(self.corrupt_images, device=self.accelerator.device), "sum"))


def learning_rate(cfg: PretrainConfig, effective_batch: int) -> float:
    if cfg.learning_rate is not None:
        logger.info("learning rate %.3g set explicitly (blr %.3g not used)", cfg.learning_rate, cfg.blr)
        return cfg.learning_rate
    lr = scaled_lr(cfg.blr, effective_batch)
    logger.info("learning rate %.4g = blr %.3g x effective batch %d / 256", lr, cfg.blr, effective_batch)
    return lr


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    cfg = parse_config(PretrainConfig, argv, description=__doc__)
    # the demo's own folder, only when the run names no data of its own (never the user's folder)
    cfg, demo_dirs = demo_data_dirs(cfg, {"train_dir": DEMO_DATA_DIR})
    if cfg.push_to_hub:  # the login and the repository now, not after training
        check_hub_access(cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private_repo)
    accelerator, checkpoints, resume_path = start_run(cfg, make_accelerator)
    is_main = accelerator.is_main_process
    config_yaml = to_yaml(cfg)  # secrets masked
    if is_main:
        (Path(cfg.output_dir) / "config.yaml").write_text(config_yaml)
    if demo_dirs:
        has_queries = lambda folder: any(folder.glob("validation-*.parquet"))  # noqa: E731  (older demo data had none)
        if is_main and ensure_demo_data(cfg.train_dir, write_demo_dataset, complete=has_queries):
            logger.info("wrote the demo dataset to %s", cfg.train_dir)
        accelerator.wait_for_everyone()
    if cfg.train_dir is not None:
        detect_local_format(cfg.train_dir, split=cfg.train_split)  # a missing, empty or image-less folder fails now, not after the model

    # ---- data format, model, stream ----------------------------------------------------------------
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pixel_format, raw_source = probe_data(cfg)
    stats = image_statistics(cfg, pixel_format, raw_source, show_progress=is_main)
    logger.info("data: %s; normalised with mean %s, std %s (%s)", pixel_format.describe(), stats[0], stats[1], stats[2])
    set_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(cfg, pixel_format.num_channels)
    if cfg.gradient_checkpointing:  # transformers >= 5 names it activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.to(accelerator.device)  # before the optimizer: AdamW is fused on GPUs
    model_config = model.config
    stream = build_stream(cfg, accelerator, model_config.image_hw, pixel_format)
    monitor = build_monitor(cfg, accelerator, model_config.image_hw, pixel_format, stats)
    loader = make_dataloader(stream, cfg.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    num_examples = cfg.num_train_examples or count_examples(cfg.train_dir or stream.source, cfg.train_split)

    # ---- AdamW (the official groups: tokens decayed), lr = blr x batch / 256, warm-up + cosine -------
    eff_batch = effective_batch_size(
        cfg.per_device_train_batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps
    )
    lr = learning_rate(cfg, eff_batch)
    total_steps, warmup_steps = schedule_lengths(cfg, eff_batch, num_examples)
    logger.info(
        "effective batch %d = %d per device x %d processes x %d accumulation; %d optimizer steps (%d warm-up); "
        "%s training examples",
        eff_batch, cfg.per_device_train_batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps,
        total_steps, warmup_steps, num_examples if num_examples else "unknown number of",
    )
    groups = pretraining_param_groups(model, cfg.weight_decay)
    optimizer = create_optimizer(groups, lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    scheduler = create_scheduler(optimizer, warmup_steps, total_steps, cfg.min_lr)
    compile_model(model, cfg.torch_compile)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    # ---- resume, train -------------------------------------------------------------------------------
    set_seed(cfg.seed, device_specific=True)  # different masks on every process
    run = PretrainRun(accelerator, cfg, checkpoints, model, scheduler, stream, loader, stats, model_config, config_yaml)
    run.restore(resume_path, total_steps)
    run.tell_the_story(monitor, resume_path)
    start_trackers(accelerator, cfg, "mae_pretrain", lr=lr, effective_batch=eff_batch)
    loop = TrainingLoop(
        accelerator, model, optimizer, scheduler, cfg, state=run.state, steps_per_epoch=None, max_steps=total_steps,
        micro_batches=run.micro_batches, loss_of=run.loss_of, save=run.save, checkpoints=checkpoints,
        end_of_epoch=run.end_of_epoch, on_log=run.on_log, on_step_end=run.on_step_end, guard=run.guard,
        eval_steps=cfg.eval_steps, evaluate=run.evaluate if monitor is not None else None,
        checkpoint_at_end=True, stop=GracefulStop(accelerator, resume_command(__file__, argv, accelerator.num_processes)),
        redirect_logs=logging_redirect_tqdm,
    )
    try:
        if monitor is not None and run.state["step"] == 0 and not run.history.series("knn/cls_top1")[0]:
            run.evaluate(0)  # the starting point: random init, or the published checkpoint being continued
        loop.run(start_epoch=run.state["epoch"])
    except NonFiniteLossError as err:
        logger.error("%s", err)
        accelerator.end_training()
        return 2
    exit_code = export_run(accelerator, model, cfg, run, resume_path, pixel_format, stats, num_examples,
                           eff_batch, lr)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def export_run(accelerator, model, cfg: PretrainConfig, run: PretrainRun, resume_path, pixel_format, stats,
               num_examples, eff_batch: int, lr: float) -> int:
    """The model (weights, config, code, image processor), its reconstruction picture and card, the Hub push.
    Returns the exit code (1 when the push failed)."""
    state, is_main, model_config = run.state, accelerator.is_main_process, accelerator.unwrap_model(model).config
    corrupt_total = run.corrupt_images_total()
    full_state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards (collective: every process)
    accelerator.wait_for_everyone()
    output_dir = Path(cfg.output_dir)
    recon = None
    if run.preview is not None and (is_main or run.sharded):
        recon = write_reconstruction(
            accelerator.unwrap_model(model), run.preview, output_dir / "reconstruction.png", cfg.seed, stats[:2],
            save=is_main,
        )
    elif (
        resume_path is not None
        and Path(resume_path).resolve().is_relative_to(output_dir.resolve())
        and (output_dir / "reconstruction.png").exists()
    ):  # this finished run, exported again: its own picture stands
        recon = output_dir / "reconstruction.png"
    if not is_main:
        return 0
    curves = plot_training_curves(run.history, output_dir / "training_curves.png")
    grids = [(int(p.stem.removeprefix("step_")), p) for p in (output_dir / "reconstructions").glob("step_*.png")
             if p.stem.removeprefix("step_").isdigit() and int(p.stem.removeprefix("step_")) <= state["step"]]
    over_time = reconstructions_over_time(grids, model_config.image_hw, output_dir / "reconstructions_over_time.png")
    log_pictures(accelerator, cfg, state["step"], {"training_curves": curves, "reconstructions_over_time": over_time})
    monitor = run.monitor
    unwrapped = accelerator.unwrap_model(model)
    export_model(unwrapped, output_dir, state_dict=full_state_dict,
                 image_processor=pixel_format_image_processor(unwrapped, pixel_format, *stats[:2]))
    write_model_card(
        output_dir,
        card_data={
            "license": "apache-2.0",
            "library_name": "transformers",
            "pipeline_tag": "image-feature-extraction",
            "tags": ["mae", "masked-autoencoder", "vision", "self-supervised", "modeling_mae"],
            "datasets": [cfg.dataset_name] if not cfg.train_dir and cfg.dataset_name else None,
            "model_name": cfg.hub_model_id or output_dir.name,
        },
        model_name=cfg.hub_model_id or output_dir.name,
        repo_id=cfg.hub_model_id or str(output_dir),
        dataset_name=cfg.dataset_name if not cfg.train_dir else f"local data ({cfg.train_dir})",
        reconstruction_png=recon.name if recon else None,
        mask_ratio=model_config.mask_ratio,
        architecture=f"{cfg.model_preset if not cfg.model_name_or_path else cfg.model_name_or_path}: "
        f"{model_config.hidden_size}-d x {model_config.num_hidden_layers} encoder, "
        f"{model_config.decoder_hidden_size}-d x {model_config.decoder_num_hidden_layers} decoder, "
        f"{model_config.image_hw[0]}px, patch {model_config.patch_size}",
        steps=state["step"],
        samples_seen=state["samples_seen"],
        epochs=f"{state['samples_seen'] / num_examples:.2f}" if num_examples else "unknown",
        final_loss=f"{state['last_loss']:.4f}",
        effective_batch=eff_batch,
        per_device_batch=cfg.per_device_train_batch_size,
        num_processes=accelerator.num_processes,
        accumulation=cfg.gradient_accumulation_steps,
        lr=f"{lr:.4g} (blr {cfg.blr:g} x {eff_batch} / 256)" if cfg.learning_rate is None else f"{lr:.4g} (set explicitly)",
        skipped_steps=run.guard.skipped,
        corrupt_images=corrupt_total,
        pixels=f"{pixel_format.describe()}; mean {stats[0]}, std {stats[1]} ({stats[2]})",
        curves_png=curves.name if curves else None,
        over_time_png=over_time.name if over_time else None,
        knn_protocol=(f"bank {monitor.bank.total} images, {monitor.queries.total} queries, k {cfg.knn_k}, "
                      f"T {cfg.knn_temperature}") if monitor is not None else None,
        **knn_card_values(run.history),
        # the recipe with the model's own values for the settings left to the checkpoint / preset
        config_yaml=to_yaml(dataclasses.replace(
            cfg, mask_ratio=model_config.mask_ratio, norm_pix_loss=model_config.norm_pix_loss)),
    )
    if cfg.write_space_files:
        write_space_files(output_dir, examples=run.preview, title=cfg.hub_model_id or output_dir.name)
    logger.info("exported the model, image processor and model card to %s", output_dir)
    if cfg.push_to_hub:
        try:
            url = push_to_hub(
                output_dir, cfg.hub_model_id, cfg.hub_include_checkpoints, cfg.hub_private_repo, cfg.hub_token
            )
            logger.info("pushed to %s", url)
        except HubPushError as err:
            logger.error("%s", err)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
