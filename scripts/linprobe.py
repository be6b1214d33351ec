#!/usr/bin/env python
"""Linear probing of a pretrained MAE encoder (the paper's Table 10 recipe).

    accelerate launch scripts/linprobe.py --config configs/linprobe/vit_base.yaml \
        --model_name_or_path ./mae-pretrained | HUB_ID | mae_pretrain_vit_base.pth \
        --dataset_name ILSVRC/imagenet-1k --output_dir outputs/mae-vit-base-linprobe
    python scripts/linprobe.py --config configs/linprobe/demo.yaml        # CPU demo, synthetic data

The loop, top to bottom: `MAEForImageClassification` with `pooling="cls"` and `linear_probe_head`
(normalised CLS token -> BatchNorm1d(affine=False) -> Linear) -> the encoder frozen
(`requires_grad=False`) and kept in eval mode, features computed without gradients -> only the head
trains (its BatchNorm running statistics update), with the official LARS (trust coefficient 0.001)
-> warm-up + cosine lr per optimizer step -> after every epoch: top-1 / top-5 / loss on the
validation split, a resumable checkpoint, the best model in `output_dir/best`; at the end the whole
classifier (frozen encoder + trained head) in `output_dir` with `id2label` and a model card of the measured accuracy.

`--cache_features`: the first full epoch writes this process's training features to
`feature_cache_dir`; later epochs train the head on them without running the encoder (each image
then keeps the augmented view of the cached epoch).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import MIXED_PRECISION, MIXED_PRECISION_HELP, REPORT_TO


@dataclass(frozen=True)
class LinprobeConfig:
    """Linear probe of a pretrained MAE (defaults: the ViT-B/16 recipe of the paper, Table 10)."""

    # model
    model_name_or_path: str = option(
        "", help="pretrained MAE: save_pretrained directory, Hub id or official .pth (required)", hub_or_path=True)
    # what the checkpoint's weights cannot say (official / timm files of other widths, a new resolution)
    num_attention_heads: Optional[int] = option(None, help="encoder heads; official widths 768/1024/1280 need none")
    decoder_num_attention_heads: Optional[int] = option(None, help="decoder heads (512-d decoder: 16)")
    image_size: Optional[int] = option(None, help="train at this resolution: position tables are interpolated")
    # data: a Hub dataset (both splits), or local folders (parquet / webdataset / images)
    dataset_name: str | None = option(None, help="Hub dataset with both splits; or use train_dir / validation_dir")
    dataset_config_name: str | None = option(None, help="configuration name of the Hub dataset")
    train_dir: str | None = option(None, help="local training folder (parquet, webdataset .tar or class folders)")
    validation_dir: str | None = option(None, help="local validation folder, same layouts")
    train_split: str = option("train", help="split of dataset_name to train on")
    validation_split: str = option("validation", help="split of dataset_name to evaluate on")
    image_column: str | None = option(None, help="image column; detected when unset (image, jpg, ...)")
    label_column: str | None = option(None, help="label column; detected when unset (label, cls, ...)")
    label_names: list[str] | None = option(
        None, help="the label map (id i = label_names[i]); default: the training split's classes")
    num_labels: int | None = option(None, help="classes; default: from the ClassLabel feature, else max label + 1")
    create_demo_data: bool = option(
        False, help="no data named: train on synthetic 4-class folders written once into outputs/demo_cls")
    max_train_samples: int | None = option(None, help="use only N training examples, drawn at random (seed)")
    max_eval_samples: int | None = option(None, help="use only N validation examples, drawn at random (seed)")
    dataloader_num_workers: int = option(8, help="DataLoader worker processes per training process")
    max_corrupt_fraction: float = option(
        0.1, help="stop when more of a split than this share cannot be decoded (the rest are skipped)")
    eval_crop_pct: float = option(224 / 256, help="resize to size / crop_pct, then center crop")
    adapt_channels: bool = option(
        False, help="images unlike the checkpoint's (channels, bit depth): adapt the checkpoint to them, else stop")
    # feature cache
    cache_features: bool = option(False, help="encode every image once and train the head on cached features")
    feature_cache_dir: str | None = option(None, help="where cached features go; default: OUTPUT_DIR/feature_cache")
    # optimisation: LARS, lr = blr * effective batch / 256 unless learning_rate is given
    per_device_train_batch_size: int = option(512, help="training images per process per micro-batch")
    per_device_eval_batch_size: int = option(256, help="evaluation images per process per batch")
    gradient_accumulation_steps: int = option(4, help="micro-batches per optimizer step (512 x 8 GPUs x 4 = 16384)")
    blr: float = option(0.1, help="base learning rate: lr = blr x effective batch / 256")
    learning_rate: float | None = option(None, help="absolute learning rate; when set, blr is not used")
    momentum: float = option(0.9, help="LARS momentum")
    weight_decay: float = option(0.0, help="LARS weight decay")
    min_lr: float = option(0.0, help="learning rate at the end of the cosine schedule")
    num_train_epochs: int = option(90, help="epochs to train (with the warm-up)")
    num_warmup_epochs: float = option(10, help="epochs of linear learning-rate warm-up")
    # runtime
    mixed_precision: str | None = option(
        "auto", help=MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION)
    seed: int = option(0, help="seed of the head's initialisation and the data order")
    output_dir: str = option("outputs/mae-linprobe", help="where the model, checkpoints and logs go")
    checkpointing_steps: int | None = option(
        None, help="also save every N optimizer steps (always at each epoch end)")
    checkpoints_total_limit: int | None = option(2, help="keep only the last N checkpoints; none: keep all")
    resume_from_checkpoint: str | None = option(None, help="'latest' or a checkpoint directory to resume from")
    overwrite_output_dir: bool = option(False, help="start afresh in an output_dir that holds another run's results")
    allow_config_change_on_resume: bool = option(
        False, help="resume even if model / data / seed / effective batch / lr differ from the checkpoint's")
    with_tracking: bool = option(False, help="log metrics to the trackers of report_to")
    report_to: str = option("tensorboard", help="trackers for with_tracking", choices=REPORT_TO)
    logging_steps: int = option(50, help="log loss and lr every N optimizer steps")
    # hub
    push_to_hub: bool = option(False, help="upload the output directory to hub_model_id at the end")
    hub_model_id: str | None = option(None, help="Hub repository to push to (user/name)")
    hub_token: str | None = option(None, help="Hub token; default: HF_TOKEN or the `hf auth login` one")
    hub_private_repo: bool | None = option(None, help="create the Hub repository private")
    hub_include_checkpoints: bool = option(False, help="upload checkpoints/ too")


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


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(LinprobeConfig, description=__doc__)

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from modeling_mae.training.augmentation import LinprobeTrainTransform  # noqa: E402
from modeling_mae.training.checkpoint import CheckpointManager  # noqa: E402
from modeling_mae.training.classification_data import (  # noqa: E402
    UnreadableImages,
    build_classification_loaders,
    classification_pixel_path,
    label_maps,
    load_classification_splits,
    make_synthetic_classification,
    report_class_balance,
    set_train_epoch,
)
from modeling_mae.training.classifier_export import finish_classifier_run  # noqa: E402
from modeling_mae.training.config import to_yaml  # noqa: E402
from modeling_mae.training.demo_data import demo_data_dirs, ensure_demo_data  # noqa: E402
from modeling_mae.training.evaluation import (  # noqa: E402
    EpochLoss,
    evaluate_classifier,
    format_epoch_line,
    format_per_class,
    load_metric,
)
from modeling_mae.training.export import check_hub_access, export_model  # noqa: E402
from modeling_mae.training.linear_probe import FeatureCache, ProbeHead, feature_cache_key  # noqa: E402
from modeling_mae.training.model_loading import adapt_to_pixel_path, checkpoint_options, load_classifier  # noqa: E402
from modeling_mae.training.optim import build_lars, create_scheduler, effective_batch_size, scaled_lr  # noqa: E402
from modeling_mae.training.runtime import (  # noqa: E402
    GracefulStop,  # noqa: E402
    make_accelerator,
    optimizer_steps_per_epoch,
    quiet_library_loggers,
    resume_command,  # noqa: E402
    tracker_hparams,  # noqa: E402
)


logger = logging.getLogger(__name__)

# create_demo_data: the synthetic 4-class folders, written here once
DEMO_DATA_DIRS = {"train_dir": "outputs/demo_cls/train", "validation_dir": "outputs/demo_cls/validation"}


def freeze_encoder(model) -> None:
    """No gradients for the encoder, and eval mode (call again after every `model.train()`)."""
    model.mae.requires_grad_(False)
    model.mae.eval()


def main(argv=None) -> int:
    cfg = parse_config(LinprobeConfig, argv, description=__doc__)
    # the demo's own folders, only when the run names no data of its own (never the user's folders)
    cfg, demo_dirs = demo_data_dirs(cfg, DEMO_DATA_DIRS)
    cfg.check_required()
    if cfg.push_to_hub:  # the login and the repository now, not after training
        check_hub_access(cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private_repo)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_library_loggers()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.with_tracking, cfg.report_to,
                                   gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # before anything is written: refuse another run's output directory, check a resumed config
    manager = CheckpointManager(cfg.output_dir, keep_last=cfg.checkpoints_total_limit)
    resume = manager.begin(accelerator, cfg)
    if accelerator.is_main_process:
        print(f"# resolved config\n{to_yaml(cfg)}", flush=True)
    set_seed(cfg.seed)
    if demo_dirs and accelerator.is_main_process:
        for field_name, count, seed in (("train_dir", 96, 0), ("validation_dir", 32, 1)):
            ensure_demo_data(getattr(cfg, field_name), functools.partial(
                make_synthetic_classification, num_per_class=count, seed=seed), field=field_name)
    accelerator.wait_for_everyone()

    # ---- data and model: frozen encoder (CLS features) + BatchNorm + Linear ------------------------
    splits = load_classification_splits(cfg, accelerator)
    model = load_classifier(cfg.model_name_or_path, pooling="cls", linear_probe_head=True, drop_path_rate=0.0,
                            num_labels=len(splits.class_names), **label_maps(splits.class_names),
                            **checkpoint_options(cfg))
    # the checkpoint's pixels (channels, bit depth, statistics), checked against the data's
    pixel_path = classification_pixel_path(cfg, model.config.num_channels, splits, progress=accelerator.is_main_process)
    logger.info("pixels: %s", pixel_path.describe())
    model = adapt_to_pixel_path(model, pixel_path)
    normalize_on_device = pixel_path.normalize  # uint8 or float batch -> normalised with the run's mean / std
    freeze_encoder(model)
    size = model.config.image_hw
    processor = pixel_path.image_processor(model, crop_pct=cfg.eval_crop_pct)  # = the evaluation transform
    train_transform = LinprobeTrainTransform(size)  # PIL (8-bit RGB) or float tensors (other formats)
    train_loader, eval_loader = build_classification_loaders(
        cfg, accelerator, splits, train_transform, pixel_path.eval_transform(size, cfg.eval_crop_pct),
        pixel_format=pixel_path.array_format,
    )
    names = splits.class_names
    balance_warnings = report_class_balance(names, splits.train_counts)
    bad_train = UnreadableImages(splits.train, splits.image_column, "training", cfg.max_corrupt_fraction)
    bad_val = UnreadableImages(splits.validation, splits.image_column, "validation", cfg.max_corrupt_fraction,
                               log=accelerator.is_main_process)
    encoder = model.mae.to(accelerator.device)
    head = ProbeHead(model)

    # ---- LARS over the head, schedule per optimizer step ------------------------------------------
    batch = effective_batch_size(cfg.per_device_train_batch_size, accelerator.num_processes,
                                 cfg.gradient_accumulation_steps)
    lr = cfg.learning_rate or scaled_lr(cfg.blr, batch)
    optimizer = build_lars(list(head.parameters()), lr, cfg.momentum, cfg.weight_decay)
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.gradient_accumulation_steps)
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
        key = feature_cache_key(
            encoder, splits, transform=train_transform, processes=accelerator.num_processes,
            batch_size=cfg.per_device_train_batch_size, seed=cfg.seed,
            dataset=cfg.dataset_name or cfg.train_dir, mixed_precision=accelerator.mixed_precision,
        )
        cache = FeatureCache(cfg.feature_cache_dir or Path(cfg.output_dir) / "feature_cache",
                             accelerator.process_index, key=key)

    # ---- resume ------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "best_top1": -1.0, "best_epoch": -1, "history": [], "unreadable_train": [],
             "per_class": {}}
    epoch_loss = EpochLoss()
    if resume is not None:
        state, _ = manager.load(accelerator, resume)
        accelerator.step = 0  # checkpoints end an optimizer step: count micro-batches afresh (the accumulation may differ)
        bad_train.load_state_dict(state.get("unreadable_train"))
        epoch_loss.load_state_dict(state.get("epoch_loss"))
        logger.info("resumed from %s at step %d", resume, state["step"])
    if cfg.with_tracking:
        accelerator.init_trackers("mae_linprobe", tracker_hparams(cfg))

    def save_checkpoint():
        bad_train.merge(accelerator)  # a collective: every process saves at the same steps
        state["unreadable_train"] = bad_train.state_dict()
        epoch_loss.flush(accelerator)
        state["epoch_loss"] = epoch_loss.state_dict()
        return manager.save(accelerator, state["step"], trainer_state=state, config_yaml=to_yaml(cfg))

    # ---- train the head ----------------------------------------------------------------------------
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    announced = False  # the cache's use is logged once
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
            if not announced:
                logger.info("training the head on the cached features in %s (same weights, files, labels and "
                            "transform: %d examples of %s)", cache.path.parent, key["examples"], key["dataset"])
                announced = True
            batches = itertools.islice(cache.dataloader(cfg.per_device_train_batch_size, cfg.seed, epoch), skip, None)
        else:
            set_train_epoch(train_loader, epoch)
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader

            def image_batches(loader=loader):
                for pixels, labels, used, asked in loader:
                    bad_train.record(used, asked)  # unreadable files were replaced by the next readable ones
                    yield features_of(pixels), labels

            batches = image_batches()
        writing_cache = cache is not None and not from_cache and skip == 0
        if state["step"] <= epoch * steps_per_epoch:  # a new epoch, not one resumed mid-way
            epoch_loss.reset()
        epoch_end = (epoch + 1) * steps_per_epoch
        step_losses = []  # the micro-batches' losses of the step under way
        for features, labels in batches:
            features, labels = features.to(accelerator.device), labels.to(accelerator.device)
            if writing_cache:
                cache.add(features, labels)
            if state["step"] == epoch_end:
                continue  # an incomplete last group of micro-batches: cached (all the epoch's views), not trained on
            with accelerator.accumulate(head):
                loss = criterion(head(features).float(), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_loss.add(loss)
            step_losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            step_loss, step_losses = torch.stack(step_losses).mean(), []  # the step's loss: its micro-batches' mean
            scheduler.step()
            state["step"] += 1
            progress.update(1)
            if state["step"] % cfg.logging_steps == 0:
                progress.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if cfg.with_tracking:
                    accelerator.log({"train/loss": step_loss.item(), "train/lr": optimizer.param_groups[0]["lr"]},
                                    step=state["step"])
            saved = cfg.checkpointing_steps and state["step"] % cfg.checkpointing_steps == 0
            if saved:
                save_checkpoint()
            if stop.requested():  # SIGTERM / Ctrl-C (on any process): checkpoint this step, then exit
                path = manager.latest() if saved else save_checkpoint()
                progress.close()
                stop.exit(state["step"], path)
            if state["step"] == epoch_end and not writing_cache:
                break  # the epoch ends after steps_per_epoch optimizer steps
        if writing_cache:
            cache.save()
            logger.info("cached the training features in %s", cache.path.parent)

        # ---- evaluate every epoch; keep the best model ----------------------------------------------
        head.eval()
        results = evaluate_classifier(lambda pixels: head(features_of(pixels)), eval_loader, accelerator,
                                      len(names), metric, unreadable=bad_val)
        train_loss = epoch_loss.mean(accelerator)
        state["epoch"] = epoch + 1
        state["per_class"][str(epoch + 1)] = results.pop("per_class")  # [[correct, total] per class]
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, **results})
        logger.info("%s", format_epoch_line(epoch + 1, train_loss, results, len(names)))
        if cfg.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state["step"])
        if results["top1"] > state["best_top1"]:
            state["best_top1"], state["best_epoch"] = results["top1"], epoch + 1
            export_model(model, Path(cfg.output_dir) / "best", image_processor=processor,
                         is_main_process=accelerator.is_main_process)
        path = save_checkpoint()
        if stop.requested():  # a signal during the evaluation: the epoch's checkpoint is written
            progress.close()
            stop.exit(state["step"], path)
    scope.close()
    progress.close()
    if state["history"]:
        last_per_class = state["per_class"][str(state["epoch"])]
        logger.info("per-class top-1 (last epoch): %s", format_per_class(names, last_per_class))

    # ---- export the classifier (frozen encoder + trained head), card, Hub ----------------------------
    bad_train.merge(accelerator)
    state["unreadable_train"] = bad_train.state_dict()
    exit_code = finish_classifier_run(accelerator, model, cfg, state, script="linprobe.py", method="linear probe",
                                      splits=splits, image_processor=processor, data_warnings=balance_warnings)
    accelerator.end_training()
    return exit_code


if __name__ == "__main__":
    sys.exit(run_main(main))
