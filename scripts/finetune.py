#!/usr/bin/env python
"""Fine-tune a pretrained MAE encoder for image classification (the paper's Table 9 recipe).

    accelerate launch scripts/finetune.py --config configs/finetune/vit_base.yaml \
        --model_name_or_path facebook/... | ./mae-pretrained | mae_pretrain_vit_base.pth \
        --dataset_name ILSVRC/imagenet-1k --output_dir outputs/mae-vit-base-ft
    python scripts/finetune.py --config configs/finetune/demo.yaml        # CPU demo, synthetic data

The loop, top to bottom: `MAEForImageClassification` from the pretrained encoder (mean pooling +
fc_norm + Linear, drop path) -> AdamW over layer-wise lr-decayed parameter groups (timm) -> per
step: uint8 batch -> normalise on the device -> random erasing -> Mixup/CutMix (timm) -> soft-target
cross-entropy -> warm-up + cosine lr per optimizer step (transformers) -> after every epoch: top-1 /
top-5 / loss on the validation split (`evaluate` module, `gather_for_metrics`), a resumable
checkpoint, the best model in `output_dir/best`; at the end the last model in `output_dir` (with
`id2label` and a model card reporting the measured accuracy), optionally pushed to the Hub.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from modeling_mae_cli import option, parse_config, run_main
from modeling_mae_cli.choices import MIXUP_MODES
from modeling_mae_cli.run_config import ClassifierRunConfig, script_defaults


@dataclass(frozen=True)
@script_defaults(per_device_train_batch_size=32, output_dir="outputs/mae-finetune")
class FinetuneConfig(ClassifierRunConfig):
    """Fine-tune a pretrained MAE (defaults: the ViT-B/16 recipe of the paper, Table 9).

    Shared with every training script (`RunConfig`): the step (batch, accumulation, clipping, precision,
    compile, seed), checkpoints (also at each epoch end), logging and the Hub; with the linear probe
    (`ClassifierRunConfig`): the pretrained model, the labelled splits, the epochs and the lr rule."""

    drop_path_rate: float = option(0.1, help="stochastic depth rate of the last block (linear over depth)")
    # augmentation (official: RandAugment 9 / 0.5, random erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1)
    crop_scale: list[float] = option([0.08, 1.0], help="RandomResizedCrop area range min,max")
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", help="timm auto-augment policy; none: off")
    reprob: float = option(0.25, help="random erasing probability")
    mixup: float = option(0.8, help="mixup alpha; 0: off")
    cutmix: float = option(1.0, help="cutmix alpha; 0: off")
    mixup_prob: float = option(1.0, help="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = option(0.5, help="probability of cutmix instead of mixup when both are on")
    mixup_mode: str = option("batch", help="one mixing per batch, pair or element", choices=MIXUP_MODES)
    label_smoothing: float = option(0.1, help="label smoothing of the targets")
    # AdamW with layer-wise lr decay
    layer_decay: float = option(0.65, help="layer-wise lr decay in (0, 1]: block i gets lr x decay^(depth - i)")
    weight_decay: float = option(0.05, help="AdamW weight decay (not on biases, norms, positions, tokens)")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"`layer_decay` must be in (0, 1], got {self.layer_decay}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"`mixup_mode` must be batch, pair or elem, got {self.mixup_mode!r}")


if __name__ == "__main__":  # --help and usage errors answer before torch, transformers and datasets load
    parse_config(FinetuneConfig, description=__doc__)

from accelerate.utils import set_seed  # noqa: E402

from modeling_mae.training.augmentation import (  # noqa: E402
    build_criterion,
    build_mixup,
    build_random_erasing,
    finetune_train_transform,
    prepare_mixup_batch,
)
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
from modeling_mae.training.loop import compile_model, start_run, start_trackers  # noqa: E402
from modeling_mae.training.model_loading import adapt_to_pixel_path, checkpoint_options, load_classifier  # noqa: E402
from modeling_mae.training.optim import (  # noqa: E402
    create_optimizer,
    create_scheduler,
    effective_batch_size,
    layer_decay_param_groups,
    scaled_lr,
)
from modeling_mae.training.runtime import (  # noqa: E402
    GracefulStop,
    make_accelerator,
    optimizer_steps_per_epoch,
    resume_command,
)


logger = logging.getLogger(__name__)


def main(argv=None) -> int:
    cfg = parse_config(FinetuneConfig, argv, description=__doc__)
    # the demo's own folders, only when the run names no data of its own (never the user's folders)
    cfg, demo_dirs = demo_data_dirs(cfg, DEMO_CLASSIFICATION_DIRS)
    cfg.check_required()
    if cfg.push_to_hub:  # the login and the repository now, not after training
        check_hub_access(cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private_repo)
    accelerator, checkpoints, resume = start_run(cfg, make_accelerator)
    set_seed(cfg.seed)  # the same new head on every process
    write_demo_classification(accelerator, cfg, demo_dirs)

    # ---- data and model: the pretrained encoder + a new head with the dataset's labels -------------
    splits = load_classification_splits(cfg, accelerator)
    model = load_classifier(cfg.model_name_or_path, drop_path_rate=cfg.drop_path_rate, pooling="mean",
                            linear_probe_head=False, num_labels=len(splits.class_names),
                            **label_maps(splits.class_names), **checkpoint_options(cfg))
    # the checkpoint's pixels (channels, bit depth, statistics), checked against the data's
    pixel_path = classification_pixel_path(cfg, model.config.num_channels, splits, progress=accelerator.is_main_process)
    logger.info("pixels: %s", pixel_path.describe())
    model = adapt_to_pixel_path(model, pixel_path)
    normalize_on_device = pixel_path.normalize  # uint8 or float batch -> normalised with the run's mean / std
    size = model.config.image_hw
    processor = pixel_path.image_processor(model, crop_pct=cfg.eval_crop_pct)  # = the evaluation transform
    train_loader, eval_loader = build_classification_loaders(
        cfg, accelerator, splits,
        finetune_train_transform(pixel_path, size, cfg.auto_augment, scale=cfg.crop_scale),
        pixel_path.eval_transform(size, cfg.eval_crop_pct), pixel_format=pixel_path.array_format,
    )
    run = ClassifierRun(accelerator, cfg, checkpoints, splits, log=logger)

    # ---- AdamW over layer-wise lr-decayed groups (fused on GPUs: built on the device), schedule per step
    model.to(accelerator.device)
    batch = effective_batch_size(cfg.per_device_train_batch_size, accelerator.num_processes,
                                 cfg.gradient_accumulation_steps)
    lr = cfg.learning_rate or scaled_lr(cfg.blr, batch)
    groups = layer_decay_param_groups(model, lr, cfg.weight_decay, cfg.layer_decay)
    optimizer = create_optimizer(groups, lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    compile_model(model, cfg.torch_compile)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.gradient_accumulation_steps)
    scheduler = create_scheduler(optimizer, round(cfg.num_warmup_epochs * steps_per_epoch),
                                 steps_per_epoch * cfg.num_train_epochs, min_lr=cfg.min_lr)
    accelerator.register_for_checkpointing(scheduler)
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing, len(run.names), cfg.mixup_prob,
                        cfg.mixup_switch_prob, cfg.mixup_mode)
    criterion = build_criterion(mixup is not None, cfg.label_smoothing)
    erase = build_random_erasing(cfg.reprob, accelerator.device)
    logger.info("effective batch %d, lr %.3g, %d steps/epoch, %d classes", batch, lr, steps_per_epoch, len(run.names))
    run.restore(resume)
    start_trackers(accelerator, cfg, "mae_finetune")

    # ---- train: the loop calls these ------------------------------------------------------------
    def micro_batches(epoch: int, skip: int):
        model.train()
        set_train_epoch(train_loader, epoch)
        run.start_epoch(epoch, steps_per_epoch)
        # resumed mid-epoch: skip the micro-batches already trained on, this epoch only
        return accelerator.skip_first_batches(train_loader, skip) if skip else train_loader

    def loss_of(batch):
        """uint8 images -> normalised -> random erasing -> mixup / cutmix -> soft-target cross-entropy."""
        pixel_values, labels, used, asked = batch
        run.bad_train.record(used, asked)  # unreadable files were replaced by the next readable ones
        images = normalize_on_device(pixel_values)
        if erase is not None:
            images = erase(images)
        images, targets = prepare_mixup_batch(mixup, images, labels)
        loss = criterion(model(pixel_values=images).logits.float(), targets)
        run.epoch_loss.add(loss)
        return loss

    def end_of_epoch(epoch: int):
        model.eval()
        run.evaluate_epoch(epoch, lambda pixels: model(pixel_values=normalize_on_device(pixels)).logits, eval_loader,
                           export_best=lambda: export_model(
                               accelerator.unwrap_model(model), Path(cfg.output_dir) / "best", image_processor=processor,
                               state_dict=accelerator.get_state_dict(model), is_main_process=accelerator.is_main_process))

    stop = GracefulStop(accelerator, resume_command(__file__, argv, accelerator.num_processes))
    run.train(model, optimizer, scheduler, steps_per_epoch, micro_batches, loss_of, end_of_epoch, stop)
    return run.finish(model, script="finetune.py", method="fine-tuned", image_processor=processor)


if __name__ == "__main__":
    sys.exit(run_main(main))
