"""Closed sets of values the scripts' flags accept, for `--help` and the parser's check.

Copies of names the model and training code define (`MAE_PRESETS`, `MASK_STRATEGIES`, `POOLING_MODES`
in `modeling_mae.configuration_mae`, the trackers of `training.runtime.resolve_trackers`): importing
those modules would import torch. tests/test_cli.py checks that the copies match the originals.
"""

MODEL_PRESETS = ("mae-vit-base-patch16", "mae-vit-large-patch16", "mae-vit-huge-patch14", "mae-tiny")
MASK_STRATEGIES = ("random", "block", "grid")
POOLING_MODES = ("mean", "cls")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16", "fp8")  # auto (training.runtime.resolve_mixed_precision) + accelerate's; None (unset): the launcher's setting
# the help of every training script's `mixed_precision` field (one text, so that the four cannot drift)
MIXED_PRECISION_HELP = ("autocast; auto: bf16 on bf16 GPUs and AMX or AVX512-BF16 CPUs, else fp32 (logged); no: fp32; "
                        "null: the accelerate launcher's")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet_ml", "all", "none")
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup: one lambda per batch, per pair, per image
CONVERSION_MODEL_CLASSES = ("MAEForImageClassification", "MAEForPreTraining", "MAEModel")  # conversion.MODEL_CLASSES
DEMO_PIXEL_KINDS = ("gray16", "bands6")  # training.pixels.DEMO_PIXEL_KINDS: generated 16-bit / multi-band demos
