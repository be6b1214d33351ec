#!/usr/bin/env python
"""Convert MAE checkpoints to and from our `save_pretrained` format.

Into our format (OUTPUT_DIR is a save_pretrained directory with the image processor, loadable with
`AutoModel*.from_pretrained(OUTPUT_DIR)`):

    python scripts/convert_checkpoint.py --source official mae_pretrain_vit_base.pth out/mae-vit-base
    python scripts/convert_checkpoint.py --source official https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth out/vis-l
    python scripts/convert_checkpoint.py --source transformers facebook/vit-mae-base out/vit-mae-base
    python scripts/convert_checkpoint.py --source timm timm/vit_base_patch16_224.mae out/timm-mae-b
    python scripts/convert_checkpoint.py --source mmseg \
        https://download.openmmlab.com/mmsegmentation/v0.5/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k/upernet_mae-base_fp16_8x2_512x512_160k_ade20k_20220426_174752-f92a2975.pth \
        out/mae-upernet-ade20k      # mmsegmentation MAE + UperNet -> MAEUperNetForSemanticSegmentation

Out of our format (INPUT is our save_pretrained directory):

    python scripts/convert_checkpoint.py --to official out/mae-vit-base mae_vit_base.pth
    python scripts/convert_checkpoint.py --to transformers out/vis-l out/vit-mae-large-hf
    python scripts/convert_checkpoint.py --to timm out/finetuned vit_base_finetuned.safetensors
    python scripts/convert_checkpoint.py --to mmseg out/mae-upernet-ade20k upernet_mae.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_mae_cli import HelpFormatter, run_main  # noqa: E402
from modeling_mae_cli.choices import CONVERSION_MODEL_CLASSES, POOLING_MODES  # noqa: E402


FORMATS = ("official", "transformers", "timm", "mmseg")
SOURCE_ONLY_OPTIONS = (
    "model_class", "image_size", "source_image_size", "num_attention_heads", "decoder_num_attention_heads", "pooling",
    "norm_pix_loss", "mask_ratio", "imagenet_labels", "state_dict_key", "revision", "allow_missing", "allow_unexpected",
    "out_indices",
)
MMSEG_INAPPLICABLE = (
    "model_class", "source_image_size", "num_attention_heads", "decoder_num_attention_heads", "pooling", "norm_pix_loss",
    "mask_ratio", "imagenet_labels", "revision", "allow_missing",
)
logger = logging.getLogger("convert_checkpoint")


def size_arg(value: str):
    """`384` or `384,512` (height, width)."""
    parts = [int(v) for v in value.replace("x", ",").split(",") if v]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts
    raise argparse.ArgumentTypeError(f"expected N or H,W, got {value!r}")


def bool_arg(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--source", choices=FORMATS, help="convert INPUT of this format into our OUTPUT_DIR")
    direction.add_argument("--to", choices=FORMATS, help="export our INPUT directory to this format at OUTPUT")
    parser.add_argument("input", help="--source: file / URL / Hub id (transformers: directory or Hub id); --to: our directory")
    parser.add_argument("output", help="--source: our save_pretrained directory; --to: .pth (official), directory "
                        "(transformers), .safetensors or .pth (timm)")
    into = parser.add_argument_group("conversion into our format")
    into.add_argument("--model_class", choices=CONVERSION_MODEL_CLASSES, default=None,
                      help="default: the class matching the checkpoint (encoder / with decoder / classifier)")
    into.add_argument("--image_size", type=size_arg, default=None,
                      help="target resolution; position embeddings are interpolated when it differs")
    into.add_argument("--source_image_size", type=size_arg, default=None,
                      help="the checkpoint's resolution, only for non-square position tables")
    into.add_argument("--num_attention_heads", type=int, default=None,
                      help="needed when the width matches no official model")
    into.add_argument("--decoder_num_attention_heads", type=int, default=None,
                      help="needed when the decoder width matches no official model")
    into.add_argument("--pooling", choices=POOLING_MODES, default=None,
                      help="pooled feature of the converted model; none: the format's")
    into.add_argument("--norm_pix_loss", type=bool_arg, default=None,
                      help="the decoder's target (official checkpoints: from their args when present)")
    into.add_argument("--mask_ratio", type=float, default=None, help="mask ratio stored in the config; none: the model's (0.75)")
    into.add_argument("--imagenet_labels", action="store_true",
                      help="name the 1000 classes of an ImageNet-1k classifier (id2label from timm)")
    into.add_argument("--state_dict_key", default=None, help="entry of the .pth holding the weights; none: 'model' if present")
    into.add_argument("--revision", default=None, help="Hub revision (transformers source)")
    into.add_argument("--allow_missing", action="store_true", help="initialise weights the checkpoint lacks")
    into.add_argument("--allow_unexpected", action="store_true", help="drop checkpoint keys the model has no place for")
    into.add_argument("--out_indices", type=lambda v: [int(i) for i in v.split(",")], default=None,
                      help="mmseg: the 4 blocks (1-based, e.g. 4,6,8,12) feeding the pyramid; default: the MAE "
                      "configs' for 12 or 24 blocks")
    out = parser.add_argument_group("export")
    out.add_argument("--allow_dropped", action="store_true", help="leave out weights the target format cannot hold")
    return parser


if __name__ == "__main__":  # --help and usage errors answer before torch and transformers load
    build_parser().parse_args()

from modeling_mae.conversion import (  # noqa: E402
    convert_official_to_mae,
    convert_timm_to_mae,
    convert_transformers_to_mae,
    load_checkpoint,
    load_mae_model,
    load_transformers_model,
    mae_to_official,
    mae_to_timm,
    mae_to_transformers,
    official_args,
    save_official,
    save_state_dict,
    timm_model_kwargs,
)
from modeling_mae.conversion.checkpoint_io import fetch_checkpoint  # noqa: E402
from modeling_mae.conversion.mmseg import convert_mmseg_to_mae, mae_to_mmseg, save_mmseg  # noqa: E402
from modeling_mae.file_modes import give_weights_usual_mode  # noqa: E402


def config_overrides(args) -> dict:
    names = ("num_attention_heads", "decoder_num_attention_heads", "pooling", "norm_pix_loss", "mask_ratio")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.imagenet_labels:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        overrides["id2label"] = {i: info.index_to_description(i) for i in range(info.num_classes())}
        overrides["label2id"] = {name: i for i, name in overrides["id2label"].items()}
    return overrides


def convert_mmseg(args):
    checkpoint = load_checkpoint(fetch_checkpoint(args.input), state_dict_key=args.state_dict_key or "state_dict")
    config, model = convert_mmseg_to_mae(
        checkpoint.state_dict, out_indices=args.out_indices, image_size=args.image_size,
        allow_unexpected=args.allow_unexpected,
    )
    model.save_pretrained(args.output)
    give_weights_usual_mode(args.output)  # safetensors writes 0600
    backbone = config.backbone_config
    print(f"mmseg {args.input} -> {type(model).__name__} in {args.output} (image {backbone.image_hw}, patch "
          f"{backbone.patch_size}, width {backbone.hidden_size}, {backbone.num_hidden_layers} blocks, blocks "
          f"{backbone.out_indices} -> pyramid, {config.num_labels} classes)")


def convert_into_ours(args):
    if args.source == "mmseg":
        return convert_mmseg(args)
    common = dict(
        model_class=args.model_class,
        image_size=args.image_size,
        allow_missing=args.allow_missing,
        allow_unexpected=args.allow_unexpected,
        **config_overrides(args),
    )
    if args.source == "transformers":
        hub = {"revision": args.revision} if args.revision else {}
        hf_model = load_transformers_model(args.input, **hub)
        config, model = convert_transformers_to_mae(hf_model, **common)
    else:
        checkpoint = load_checkpoint(fetch_checkpoint(args.input), state_dict_key=args.state_dict_key)
        if args.source == "official":
            config, model = convert_official_to_mae(
                checkpoint.state_dict, source_image_size=args.source_image_size, checkpoint_args=checkpoint.args,
                **common,
            )
        else:
            config, model = convert_timm_to_mae(checkpoint.state_dict, source_image_size=args.source_image_size, **common)
    if "id2label" in common and config.num_labels != len(common["id2label"]):
        raise ValueError(f"--imagenet_labels: the model has {config.num_labels} classes, not 1000")
    model.save_pretrained(args.output)  # also writes the image processor, auto_map and the modeling code
    give_weights_usual_mode(args.output)  # safetensors writes 0600
    print(f"{args.source} {args.input} -> {type(model).__name__} in {args.output} "
          f"(image {config.image_hw}, patch {config.patch_size}, width {config.hidden_size}, "
          f"{config.num_hidden_layers} blocks, {config.num_attention_heads} heads)")


def export_ours(args):
    if args.to == "mmseg":
        from modeling_mae import MAEUperNetForSemanticSegmentation

        model = MAEUperNetForSemanticSegmentation.from_pretrained(args.input).eval()
        path = save_mmseg(mae_to_mmseg(model), args.output, meta={"converted_from": str(args.input)})
        print(f"{args.input} ({type(model).__name__}) -> mmseg {path}")
        return
    model = load_mae_model(args.input)
    if args.to == "official":
        # the architecture and loss settings travel in the file as official checkpoints carry `args`
        path = save_official(mae_to_official(model, allow_dropped=args.allow_dropped), args.output,
                             args=official_args(model.config))
    elif args.to == "timm":
        path = save_state_dict(mae_to_timm(model, allow_dropped=args.allow_dropped), args.output, fmt="timm")
        print("timm model: timm.models.vision_transformer.VisionTransformer(**"
              + json.dumps(timm_model_kwargs(model.config, model)) + ")")
    else:
        hf_model = mae_to_transformers(model, allow_dropped=args.allow_dropped)
        hf_model.save_pretrained(args.output)
        give_weights_usual_mode(args.output)  # safetensors writes 0600
        model.default_image_processor().save_pretrained(args.output)
        path = args.output
    print(f"{args.input} ({type(model).__name__}) -> {args.to} {path}")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to is not None:
        given = [f"--{name}" for name in SOURCE_ONLY_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"{', '.join(given)} only apply to --source conversions, not to --to {args.to}")
        export_ours(args)
    else:
        if args.allow_dropped:
            parser.error("--allow_dropped applies to --to exports; use --allow_unexpected with --source")
        if args.source == "mmseg":
            given = [f"--{name}" for name in MMSEG_INAPPLICABLE if getattr(args, name) != parser.get_default(name)]
            if given:
                parser.error(f"{', '.join(given)} do not apply to --source mmseg")
        elif args.out_indices is not None:
            parser.error("--out_indices applies to --source mmseg only")
        convert_into_ours(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
