#!/usr/bin/env python
"""Linear probing of a pretrained MAE encoder (the paper's Table 10 recipe).

    accelerate launch scripts/linprobe.py --config configs/linprobe/vit_base.yaml \
        --model_name_or_path ./mae-pretrained | HUB_ID | mae_pretrain_vit_base.pth \
        --dataset_name ILSVRC/imagenet-1k --output_dir outputs/mae-vit-base-linprobe
    python scripts/linprobe.py --config configs/linprobe/demo.yaml        # CPU demo, synthetic data

The loop, top to bottom: `MAEForImageClassification` with `pooling="cls"` and `linear_probe_head`
(normalised CLS token -> BatchNorm1d(affine=False) -> Linear) -> the encoder frozen
(`requires_grad=False`) and kept in eval mode, features computed without gradients -> only the head
trains (its BatchNorm running statistics update), with LARS (timm) -> warm-up + cosine lr per
optimizer step -> after every epoch: top-1 / top-5 / loss on the validation split, a resumable
checkpoint, the best model in `output_dir/best`; at the end the whole classifier (frozen encoder +
trained head) in `output_dir` with `id2label` and a model card of the measured accuracy.

`--cache_features`: the first full epoch writes this process's training features to
`feature_cache_dir`; later epochs train the head on them without running the encoder (each image
then keeps the augmented view of the cached epoch).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from modeling_mae.training.augmentation import LinprobeTrainTransform
from modeling_mae.training.checkpoint import CheckpointManager
from modeling_mae.training.classification_data import (
    build_classification_loaders,
    label_maps,
    load_classification_splits,
    make_synthetic_classification,
    set_train_epoch,
)
from modeling_mae.training.classifier_export import finish_classifier_run
from modeling_mae.training.config import parse_config, to_yaml
from modeling_mae.training.evaluation import evaluate_classifier, load_metric
from modeling_mae.training.export import export_model
from modeling_mae.training.linear_probe import FeatureCache, ProbeHead
from modeling_mae.training.model_loading import load_classifier
from modeling_mae.training.optim import build_lars, create_scheduler, effective_batch_size, scaled_lr
from modeling_mae.training.demo_data import ensure_demo_data
from modeling_mae.training.runtime import GracefulStop, make_accelerator, resume_command, tracker_hparams
from modeling_mae.training.transforms import EvalTransform, normalize_on_device


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinprobeConfig:
    """Linear probe of a pretrained MAE (defaults: the ViT-B/16 recipe of the paper, Table 10)."""

    # model
    model_name_or_path: str = ""  # save_pretrained directory, Hub id, or official .pth checkpoint
    # data: a Hub dataset (both splits), or local folders (parquet / webdataset / images)
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_dir: str | None = None
    validation_dir: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    image_column: str | None = None
    label_column: str | None = None
    num_labels: int | None = None
    create_demo_data: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    dataloader_num_workers: int = 8
    eval_crop_pct: float = 224 / 256
    # feature cache
    cache_features: bool = False
    feature_cache_dir: str | None = None  # default: OUTPUT_DIR/feature_cache
    # optimisation: LARS, lr = blr * effective batch / 256 unless learning_rate is given
    per_device_train_batch_size: int = 512
    per_device_eval_batch_size: int = 256
    gradient_accumulation_steps: int = 4  # 512 x 8 GPUs x 4 = 16384, the paper's batch
    blr: float = 0.1
    learning_rate: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    min_lr: float = 0.0
    num_train_epochs: int = 90
    num_warmup_epochs: float = 10
    # runtime
    mixed_precision: str | None = None
    seed: int = 0
    output_dir: str = "outputs/mae-linprobe"
    checkpointing_steps: int | None = None  # also save every N optimizer steps (always at each epoch end)
    checkpoints_total_limit: int | None = 2
    overwrite_output_dir: bool = False  # start afresh in an output_dir holding another run's results
    allow_config_change_on_resume: bool = False  # resume even if model / data / seed / batch / schedule differ
    resume_from_checkpoint: str | None = None
    with_tracking: bool = False
    report_to: str = "tensorboard"
    logging_steps: int = 50
    # hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_include_checkpoints: bool = False

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_warmup_epochs <= self.num_train_epochs:
            raise ValueError(f"`num_warmup_epochs` must be in [0, num_train_epochs], got {self.num_warmup_epochs}")

    def check_required(self):
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required (a directory, a Hub id or an official .pth file)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (user/name)")


def freeze_encoder(model) -> None:
    """No gradients for the encoder, and eval mode (call again after every `model.train()`)."""
    model.mae.requires_grad_(False)
    model.mae.eval()


def main(argv=None) -> int:
    cfg = parse_config(LinprobeConfig, argv, description=__doc__)
    cfg.check_required()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.with_tracking, cfg.report_to)
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # before anything is written: refuse another run's output directory, check a resumed config
    manager = CheckpointManager(cfg.output_dir, keep_last=cfg.checkpoints_total_limit)
    resume = manager.begin(accelerator, cfg)
    if accelerator.is_main_process:
        print(f"# resolved config\n{to_yaml(cfg)}", flush=True)
    set_seed(cfg.seed)
    if cfg.create_demo_data and accelerator.is_main_process:
        for field_name, count, seed in (("train_dir", 96, 0), ("validation_dir", 32, 1)):
            if getattr(cfg, field_name):
                ensure_demo_data(getattr(cfg, field_name), functools.partial(
                    make_synthetic_classification, num_per_class=count, seed=seed), field=field_name)
    accelerator.wait_for_everyone()

    # ---- data and model: frozen encoder (CLS features) + BatchNorm + Linear ------------------------
    splits = load_classification_splits(cfg, accelerator)
    model = load_classifier(cfg.model_name_or_path, pooling="cls", linear_probe_head=True, drop_path_rate=0.0,
                            num_labels=len(splits.class_names), **label_maps(splits.class_names))
    freeze_encoder(model)
    size = model.config.image_hw
    train_loader, eval_loader = build_classification_loaders(
        cfg, accelerator, splits, LinprobeTrainTransform(size), EvalTransform(size, cfg.eval_crop_pct)
    )
    names = splits.class_names
    encoder = model.mae.to(accelerator.device)
    head = ProbeHead(model)

    # ---- LARS over the head, schedule per optimizer step ------------------------------------------
    batch = effective_batch_size(cfg.per_device_train_batch_size, accelerator.num_processes,
                                 cfg.gradient_accumulation_steps)
    lr = cfg.learning_rate or scaled_lr(cfg.blr, batch)
    optimizer = build_lars(list(head.parameters()), lr, cfg.momentum, cfg.weight_decay)
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.num_train_epochs
    scheduler = create_scheduler(optimizer, round(cfg.num_warmup_epochs * steps_per_epoch), total_steps,
                                 min_lr=cfg.min_lr)
    accelerator.register_for_checkpointing(scheduler)
    metric = load_metric("top_k_accuracy")
    criterion = torch.nn.CrossEntropyLoss()
    logger.info("effective batch %d, lr %.3g, %d steps/epoch, %d classes", batch, lr, steps_per_epoch, len(names))

    @torch.no_grad()
    def features_of(pixel_values):
        """uint8 (N, 3, H, W) -> (N, D) normalised CLS tokens of the frozen encoder."""
        with accelerator.autocast():
            return encoder(normalize_on_device(pixel_values)).pooler_output.float()

    cache = None
    if cfg.cache_features:
        cache = FeatureCache(
            cfg.feature_cache_dir or Path(cfg.output_dir) / "feature_cache", accelerator.process_index,
            key={"model": cfg.model_name_or_path, "train": cfg.dataset_name or cfg.train_dir,
                 "examples": len(splits.train), "processes": accelerator.num_processes,
                 "batch": cfg.per_device_train_batch_size},
        )

    # ---- resume ------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "best_top1": -1.0, "best_epoch": -1, "history": []}
    if resume is not None:
        state, _ = manager.load(accelerator, resume)
        logger.info("resumed from %s at step %d", resume, state["step"])
    if cfg.with_tracking:
        accelerator.init_trackers("mae_linprobe", tracker_hparams(cfg))

    def save_checkpoint():
        return manager.save(accelerator, state["step"], trainer_state=state, config_yaml=to_yaml(cfg))

    # ---- train the head ----------------------------------------------------------------------------
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    stop = GracefulStop(accelerator, resume_command(__file__, argv, accelerator.num_processes))
    scope = contextlib.ExitStack()
    scope.enter_context(stop)  # SIGTERM / Ctrl-C: finish the step, checkpoint, exit (see `stop.requested()`)
    scope.enter_context(logging_redirect_tqdm())  # log lines go above the progress bar, not glued onto it
    for epoch in range(state["epoch"], cfg.num_train_epochs):
        head.train()
        freeze_encoder(model)  # the encoder stays in eval mode
        done_in_epoch = state["step"] - epoch * steps_per_epoch
        skip = done_in_epoch * cfg.gradient_accumulation_steps
        from_cache = cache is not None and cache.exists()
        if from_cache:  # (features, labels) of the cached epoch, reshuffled
            batches = itertools.islice(cache.dataloader(cfg.per_device_train_batch_size, cfg.seed, epoch), skip, None)
        else:
            set_train_epoch(train_loader, epoch)
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            batches = ((features_of(pixels), labels) for pixels, labels, _ in loader)
        writing_cache = cache is not None and not from_cache and skip == 0
        for features, labels in batches:
            features, labels = features.to(accelerator.device), labels.to(accelerator.device)
            if writing_cache:
                cache.add(features, labels)
            with accelerator.accumulate(head):
                loss = criterion(head(features).float(), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            progress.update(1)
            if state["step"] % cfg.logging_steps == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if cfg.with_tracking:
                    accelerator.log({"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"]},
                                    step=state["step"])
            saved = cfg.checkpointing_steps and state["step"] % cfg.checkpointing_steps == 0
            if saved:
                save_checkpoint()
            if stop.requested():  # SIGTERM / Ctrl-C (on any process): checkpoint this step, then exit
                path = manager.latest() if saved else save_checkpoint()
                progress.close()
                stop.exit(state["step"], path)
        if writing_cache:
            cache.save()
            logger.info("cached the training features in %s", cache.path.parent)

        # ---- evaluate every epoch; keep the best model ----------------------------------------------
        head.eval()
        results = evaluate_classifier(lambda pixels: head(features_of(pixels)), eval_loader, accelerator,
                                      len(names), metric)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, **results})
        logger.info("epoch %d: top-1 %.2f top-5 %.2f loss %.4f", epoch + 1, results["top1"], results["top5"],
                    results["loss"])
        if cfg.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state["step"])
        if results["top1"] > state["best_top1"]:
            state["best_top1"], state["best_epoch"] = results["top1"], epoch + 1
            export_model(model, Path(cfg.output_dir) / "best", is_main_process=accelerator.is_main_process)
        path = save_checkpoint()
        if stop.requested():  # a signal during the evaluation: the epoch's checkpoint is written
            progress.close()
            stop.exit(state["step"], path)
    scope.close()
    progress.close()

    # ---- export the classifier (frozen encoder + trained head), card, Hub ----------------------------
    exit_code = finish_classifier_run(accelerator, model, cfg, state, script="linprobe.py", method="linear probe")
    accelerator.end_training()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
