"""Reference outputs of mmsegmentation's MAE + Feature2Pyramid + UPerHead + FCNHead, for the parity test.

Run by `tests/test_mmseg_parity.py` with the python of a virtual environment that has mmsegmentation
1.2.2, mmengine and mmcv-lite 2.1.0 (this file imports nothing from `modeling_mae`):

    python tests/mmseg_reference.py OUT.pt

Builds a small model the way mmsegmentation's `mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py` builds
the ViT-B one (MAE backbone with relative position bias and layer scale, LayerNorm eps 1e-6, blocks
feeding a 4/2/1/0.5 pyramid, UPerHead, FCN auxiliary head on level 2), at a non-square input, with
random weights: relative tables and gammas moved away from 0 and 1, BatchNorm statistics random.
Saves `{"state_dict": {"backbone.*", "neck.*", "decode_head.*", "auxiliary_head.*"}, "settings",
"pixel_values", "logits", "auxiliary_logits"}` (logits resized to the input by mmsegmentation).
"""

from __future__ import annotations

import sys
import types

import torch


SETTINGS = dict(
    img_size=(64, 96), patch_size=16, embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=4,
    out_indices=[0, 1, 2, 3], init_values=1.0, channels=16, auxiliary_channels=8, num_classes=5,
)


def stub_mmcv_ops():
    """mmcv-lite has no compiled ops; a few heads this model never builds import names from `mmcv.ops`
    at module level. A module whose every attribute is a dummy lets `import mmseg.models` succeed."""
    if "mmcv.ops" in sys.modules:
        return
    ops = types.ModuleType("mmcv.ops")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError(f"mmcv.ops.{name} is stubbed"))})

    ops.__getattr__ = __getattr__
    sys.modules["mmcv.ops"] = ops


def build_model(s: dict):
    stub_mmcv_ops()
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN in the recipe; the same module on one process
    dim = s["embed_dims"]
    cfg = dict(
        type="EncoderDecoder",
        backbone=dict(
            type="MAE", img_size=s["img_size"], patch_size=s["patch_size"], embed_dims=dim,
            num_layers=s["num_layers"], num_heads=s["num_heads"], mlp_ratio=s["mlp_ratio"],
            out_indices=s["out_indices"], norm_cfg=dict(type="LN", eps=1e-6), act_cfg=dict(type="GELU"),
            init_values=s["init_values"],
        ),
        neck=dict(type="Feature2Pyramid", embed_dim=dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
        decode_head=dict(
            type="UPerHead", in_channels=[dim] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
            channels=s["channels"], dropout_ratio=0.1, num_classes=s["num_classes"], norm_cfg=norm_cfg,
            align_corners=False,
        ),
        auxiliary_head=dict(
            type="FCNHead", in_channels=dim, in_index=2, channels=s["auxiliary_channels"], num_convs=1,
            concat_input=False, dropout_ratio=0.1, num_classes=s["num_classes"], norm_cfg=norm_cfg,
            align_corners=False,
        ),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    return MODELS.build(cfg)


@torch.no_grad()
def perturb(model, generator):
    """Every parameter random; relative tables and gammas away from their 0 / 1 start; BN statistics random."""
    for name, param in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif ".gamma_" in name:
            param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


@torch.no_grad()
def main(out_path: str):
    generator = torch.Generator().manual_seed(0)
    model = build_model(SETTINGS)
    perturb(model, generator)
    model.eval()
    height, width = SETTINGS["img_size"]
    pixel_values = torch.randn(2, 3, height, width, generator=generator)
    metas = [dict(img_shape=(height, width), ori_shape=(height, width))] * 2
    logits = model.encode_decode(pixel_values, metas)  # decode head, resized to the input by mmseg
    features = model.extract_feat(pixel_values)
    auxiliary = model.auxiliary_head(features)  # at the stride of its input level
    import mmseg

    torch.save(
        dict(
            state_dict={k: v.clone() for k, v in model.state_dict().items()},
            settings=SETTINGS,
            pixel_values=pixel_values,
            logits=logits,
            auxiliary_logits=auxiliary,
            mmseg_version=mmseg.__version__,
        ),
        out_path,
    )
    print(f"mmsegmentation {mmseg.__version__}: logits {tuple(logits.shape)} -> {out_path}")


if __name__ == "__main__":
    main(sys.argv[1])
