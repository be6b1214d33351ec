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

import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.run_config import ClassifierRunConfig, script_defaults


@dataclass(frozen=True)
@script_defaults(per_device_train_batch_size=512, gradient_accumulation_steps=4, output_dir="outputs/mae-linprobe",
                 per_device_eval_batch_size=256, blr=0.1, min_lr=0.0, num_train_epochs=90, num_warmup_epochs=10)
class LinprobeConfig(ClassifierRunConfig):
    """Linear probe of a pretrained MAE (defaults: the ViT-B/16 recipe of the paper, Table 10; 512 images x 8
    GPUs x 4 micro-batches = 16384 a step).

    Shared with every training script (`RunConfig`): the step (batch, accumulation, clipping, precision,
    compile, seed), checkpoints (also at each epoch end), logging and the Hub; with fine-tuning
    (`ClassifierRunConfig`): the pretrained model, the labelled splits, the epochs and the lr rule."""

    # feature cache
    cache_features: bool = option(False, help="encode every image once and train the head on cached features")
    feature_cache_dir: str | None = option(None, help="where cached features go; default: OUTPUT_DIR/feature_cache")
    # LARS
    momentum: float = option(0.9, help="LARS momentum")
    weight_decay: float = option(0.0, help="LARS weight decay")


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(LinprobeConfig, description=__doc__)

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from modeling_mae.training.augmentation import LinprobeTrainTransform  # noqa: E402
from modeling_mae.training.classification_data import (  # noqa: E402
    build_classification_loaders,
    classification_pixel_path,
    label_maps,
    load_classification_splits,
    set_train_epoch,
)
from modeling_mae.training.classification_run import (  # noqa: E402
    DEMO_CLASSIFICATION_DIRS,
    ClassifierRun,
    write_demo_classification,
)
from modeling_mae.training.demo_data import demo_data_dirs  # noqa: E402
from modeling_mae.training.export import check_hub_access, export_model  # noqa: E402
from modeling_mae.training.linear_probe import FeatureCache, ProbeHead, feature_cache_key  # noqa: E402
from modeling_mae.training.loop import compile_model, start_run, start_trackers  # noqa: E402
from modeling_mae.training.model_loading import adapt_to_pixel_path, checkpoint_options, load_classifier  # noqa: E402
from modeling_mae.training.optim import build_lars, create_scheduler, effective_batch_size, scaled_lr  # noqa: E402
from modeling_mae.training.runtime import (  # noqa: E402
    GracefulStop,
    make_accelerator,
    optimizer_steps_per_epoch,
    resume_command,
)


logger = logging.getLogger(__name__)


def freeze_encoder(model) -> None:
    """No gradients for the encoder, and eval mode (call again after every `model.train()`)."""
    model.mae.requires_grad_(False)
    model.mae.eval()


def build_feature_cache(cfg, accelerator, encoder, splits, train_transform) -> FeatureCache | None:
    """`--cache_features`: this process's training features of one full epoch, keyed by everything that
    makes them (weights, files, labels, transform, processes, batch, seed, precision)."""
    if not cfg.cache_features:
        return None
    key = feature_cache_key(
        encoder, splits, transform=train_transform, processes=accelerator.num_processes,
        batch_size=cfg.per_device_train_batch_size, seed=cfg.seed,
        dataset=cfg.dataset_name or cfg.train_dir, mixed_precision=accelerator.mixed_precision,
    )
    return FeatureCache(cfg.feature_cache_dir or Path(cfg.output_dir) / "feature_cache", accelerator.process_index,
                        key=key)


class HeadTrainingData:
    """The head's micro-batches, (features (N, D), labels (N,)) on the device: the encoder's features of this
    epoch's images, or, with `--cache_features` once a full epoch is cached, the cached ones reshuffled.

    The first full epoch writes every micro-batch to the cache, the incomplete last group too (the loop
    stops at the epoch's last optimizer step: `finish_epoch` reads the rest, then saves the cache)."""

    def __init__(self, accelerator, cfg, train_loader, cache, features_of, run):
        self.accelerator, self.cfg, self.train_loader, self.cache = accelerator, cfg, train_loader, cache
        self.features_of, self.run = features_of, run
        self.writing = {}  # epoch -> its batches, while they are written to the cache
        self.announced = False  # the cache's use is logged once

    def micro_batches(self, epoch: int, skip: int):
        cache = self.cache
        if cache is not None and cache.exists():
            if not self.announced:
                logger.info("training the head on the cached features in %s (same weights, files, labels and "
                            "transform: %d examples of %s)", cache.path.parent, cache.key["examples"],
                            cache.key["dataset"])
                self.announced = True
            cached = cache.dataloader(self.cfg.per_device_train_batch_size, self.cfg.seed, epoch)
            return self.on_device(itertools.islice(cached, skip, None), writing=False)
        set_train_epoch(self.train_loader, epoch)
        loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        batches = self.on_device(self.image_features(loader), writing=cache is not None and skip == 0)
        if cache is not None and skip == 0:
            self.writing[epoch] = batches
        return batches

    def image_features(self, loader):
        for pixels, labels, used, asked in loader:
            self.run.bad_train.record(used, asked)  # unreadable files were replaced by the next readable ones
            yield self.features_of(pixels), labels

    def on_device(self, batches, writing: bool):
        device = self.accelerator.device
        for features, labels in batches:
            features, labels = features.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if writing:
                self.cache.add(features, labels)
            yield features, labels
        if writing:
            self.cache.save()
            logger.info("cached the training features in %s", self.cache.path.parent)

    def finish_epoch(self, epoch: int) -> None:
        """The rest of an epoch being cached: cached (all the epoch's views), not trained on; the cache saved."""
        for _ in self.writing.pop(epoch, ()):
            pass


def main(argv=None) -> int:
    cfg = parse_config(LinprobeConfig, argv, description=__doc__)
    # the demo's own folders, only when the run names no data of its own (never the user's folders)
    cfg, demo_dirs = demo_data_dirs(cfg, DEMO_CLASSIFICATION_DIRS)
    cfg.check_required()
    if cfg.push_to_hub:  # the login and the repository now, not after training
        check_hub_access(cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private_repo)
    accelerator, checkpoints, resume = start_run(cfg, make_accelerator)
    set_seed(cfg.seed)
    write_demo_classification(accelerator, cfg, demo_dirs)

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
    run = ClassifierRun(accelerator, cfg, checkpoints, splits, log=logger)
    encoder = compile_model(model.mae.to(accelerator.device), cfg.torch_compile)
    head = ProbeHead(model).to(accelerator.device)

    # ---- LARS over the head, schedule per optimizer step ------------------------------------------
    batch = effective_batch_size(cfg.per_device_train_batch_size, accelerator.num_processes,
                                 cfg.gradient_accumulation_steps)
    lr = cfg.learning_rate or scaled_lr(cfg.blr, batch)
    optimizer = build_lars(list(head.parameters()), lr, cfg.momentum, cfg.weight_decay)
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.gradient_accumulation_steps)
    scheduler = create_scheduler(optimizer, round(cfg.num_warmup_epochs * steps_per_epoch),
                                 steps_per_epoch * cfg.num_train_epochs, min_lr=cfg.min_lr)
    accelerator.register_for_checkpointing(scheduler)
    criterion = torch.nn.CrossEntropyLoss()
    logger.info("effective batch %d, lr %.3g, %d steps/epoch, %d classes", batch, lr, steps_per_epoch, len(run.names))
    cache = build_feature_cache(cfg, accelerator, encoder, splits, train_transform)
    run.restore(resume)
    start_trackers(accelerator, cfg, "mae_linprobe")

    @torch.no_grad()
    def features_of(pixel_values):
        """uint8 (N, 3, H, W) -> (N, D) normalised CLS tokens of the frozen encoder."""
        with accelerator.autocast():
            return encoder(normalize_on_device(pixel_values)).pooler_output.float()

    # ---- train the head: the loop calls these ------------------------------------------------------
    data = HeadTrainingData(accelerator, cfg, train_loader, cache, features_of, run)

    def micro_batches(epoch: int, skip: int):
        head.train()
        freeze_encoder(model)  # the encoder stays in eval mode
        run.start_epoch(epoch, steps_per_epoch)
        return data.micro_batches(epoch, skip)

    def loss_of(batch):
        features, labels = batch
        loss = criterion(head(features).float(), labels)
        run.epoch_loss.add(loss)
        return loss

    def end_of_epoch(epoch: int):
        data.finish_epoch(epoch)
        head.eval()
        run.evaluate_epoch(epoch, lambda pixels: head(features_of(pixels)), eval_loader,
                           export_best=lambda: export_model(model, Path(cfg.output_dir) / "best",
                                                            image_processor=processor,
                                                            is_main_process=accelerator.is_main_process))

    stop = GracefulStop(accelerator, resume_command(__file__, argv, accelerator.num_processes))
    run.train(head, optimizer, scheduler, steps_per_epoch, micro_batches, loss_of, end_of_epoch, stop)
    return run.finish(model, script="linprobe.py", method="linear probe", image_processor=processor)


if __name__ == "__main__":
    sys.exit(run_main(main))
