"""One source per model setting in the scripts, and what a checkpoint brings along.

- `model_config` keys and the scripts' own fields for MAEConfig settings: a key set in one place is
  what the model gets; set in both, it is refused in one line naming both (`merge_model_config`).
- Continued pretraining keeps the checkpoint's `mask_ratio` / `norm_pix_loss` unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from modeling_mae import MAEConfig, MAEForPreTraining


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"config_sources_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return load_script("pretrain")


@pytest.fixture(scope="module")
def segment():
    return load_script("segment")


def pretrain_config(pretrain, tmp_path, yaml_text: str):
    """The config a user's YAML file gives (the parser of every script: `--config FILE`)."""
    path = tmp_path / "run.yaml"
    path.write_text("train_dir: unused\nmodel_preset: mae-tiny\n" + yaml_text)
    return pretrain.parse_config(pretrain.PretrainConfig, ["--config", str(path)])


def test_model_config_alone_sets_the_loss_settings(pretrain, tmp_path):
    """The issue's YAML: before, the fields' defaults (0.75 / true) overwrote model_config's values."""
    cfg = pretrain_config(pretrain, tmp_path, "model_config: {mask_ratio: 0.5, norm_pix_loss: false}\n")
    model = pretrain.build_model(cfg, num_channels=3)
    assert model.config.mask_ratio == 0.5 and model.config.norm_pix_loss is False
    cfg = pretrain_config(pretrain, tmp_path, "mask_ratio: 0.6\nnorm_pix_loss: false\n")  # the fields alone
    model = pretrain.build_model(cfg, num_channels=3)
    assert model.config.mask_ratio == 0.6 and model.config.norm_pix_loss is False
    model = pretrain.build_model(pretrain_config(pretrain, tmp_path, ""), num_channels=3)  # neither: MAEConfig's
    assert model.config.mask_ratio == 0.75 and model.config.norm_pix_loss is True


def test_a_setting_given_twice_is_refused_in_one_line(pretrain, tmp_path):
    cfg = pretrain_config(pretrain, tmp_path, "mask_ratio: 0.6\nmodel_config: {mask_ratio: 0.5}\n")
    with pytest.raises(ValueError) as info:
        pretrain.build_model(cfg, num_channels=3)
    assert str(info.value) == ("`model_config` sets mask_ratio=0.5 and the field `mask_ratio` sets 0.6; "
                               "set it in one place (the field `mask_ratio`)")
    cfg = pretrain_config(pretrain, tmp_path, "model_config: {num_channels: 1}\n")  # the data's channel count
    with pytest.raises(ValueError, match=r"^`model_config` sets num_channels=1; .*field `num_channels`"):
        pretrain.build_model(cfg, num_channels=3)


def test_merge_model_config_by_hand():
    from modeling_mae.training.model_loading import merge_model_config

    assert merge_model_config({"a": 1}, {"b": 2, "c": None}) == {"a": 1, "b": 2}
    assert merge_model_config({"c": 3}, {"c": None}) == {"c": 3}  # field unset: model_config decides
    with pytest.raises(ValueError, match=r"sets c=3 and the field `c` sets 3"):  # equal values: still two sources
        merge_model_config({"c": 3}, {"c": 3})


def test_continued_pretraining_keeps_the_checkpoints_loss_settings(pretrain, tmp_path):
    """Before, a checkpoint trained at 0.6 without norm_pix_loss continued at 0.75 with it."""
    MAEForPreTraining(MAEConfig.from_preset("mae-tiny", mask_ratio=0.6, norm_pix_loss=False)).save_pretrained(tmp_path / "pt")
    cfg = pretrain_config(pretrain, tmp_path, f"model_name_or_path: {tmp_path / 'pt'}\n")
    model = pretrain.build_model(cfg, num_channels=3)
    assert model.config.mask_ratio == 0.6 and model.config.norm_pix_loss is False
    cfg = pretrain_config(pretrain, tmp_path, f"model_name_or_path: {tmp_path / 'pt'}\nmask_ratio: 0.5\n")
    model = pretrain.build_model(cfg, num_channels=3)
    assert model.config.mask_ratio == 0.5 and model.config.norm_pix_loss is False


SEGMENT_TINY = dict(data_dir="unused", num_labels=3, out_indices=[1, 2, 3, 4], crop_size=32, eval_stride=16)


def test_segment_refuses_a_transfer_option_in_model_config(segment):
    """Before, the field's default drop_path_rate (0.1) silently replaced model_config's 0.3."""
    cfg = segment.SegmentConfig(model_preset="mae-tiny", model_config={"drop_path_rate": 0.3, "num_hidden_layers": 4},
                                **SEGMENT_TINY)
    with pytest.raises(ValueError, match=r"^`model_config` sets drop_path_rate=0.3 and the field `drop_path_rate` "
                                         r"sets 0.1; set it in one place"):
        segment.build_model(cfg)
    cfg = segment.SegmentConfig(model_preset="mae-tiny", model_config={"num_hidden_layers": 4}, drop_path_rate=0.3,
                                **SEGMENT_TINY)
    assert segment.build_model(cfg).config.backbone_config.drop_path_rate == 0.3


def test_segment_applies_model_config_to_our_checkpoint(segment, tmp_path):
    """Before, `model_config` was read only for presets and converted files: our directory ignored it."""
    config = MAEConfig.from_preset("mae-tiny", num_hidden_layers=4)
    MAEForPreTraining(config).save_pretrained(tmp_path / "pt")
    cfg = segment.SegmentConfig(model_name_or_path=str(tmp_path / "pt"), model_config={"attention_probs_dropout_prob": 0.2},
                                drop_path_rate=0.0, **SEGMENT_TINY)
    backbone = segment.load_backbone(cfg)
    assert backbone.config.attention_probs_dropout_prob == 0.2
    assert backbone.config.out_indices == [1, 2, 3, 4] and backbone.config.drop_path_rate == 0.0
    torch.testing.assert_close(backbone.mae.embeddings.cls_token,
                               MAEForPreTraining.from_pretrained(tmp_path / "pt").mae.embeddings.cls_token)


# --------------------------------------------------------------------------------------------------
# Fine-tuning a fine-tuned classifier for another label set
# --------------------------------------------------------------------------------------------------
def three_class_classifier():
    from modeling_mae import MAEForImageClassification

    model = MAEForImageClassification(MAEConfig.from_preset("mae-tiny", num_labels=3, pooling="mean"))
    with torch.no_grad():
        model.classifier.weight.normal_()  # a trained head, not the 2e-5 start
    return model


def finetune_model(path, num_labels: int, **checkpoint_options):
    """The model finetune.py builds from `path` for `num_labels` classes (its `load_classifier` call)."""
    from modeling_mae.training.model_loading import load_classifier

    names = [f"class{i}" for i in range(num_labels)]
    return load_classifier(str(path), drop_path_rate=0.1, pooling="mean", linear_probe_head=False,
                           num_labels=num_labels, id2label=dict(enumerate(names)),
                           label2id={n: i for i, n in enumerate(names)}, **checkpoint_options)


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_another_label_count_gets_a_new_head_said_in_one_line(tmp_path, caplog, layout):
    """Before: ours raised transformers' size-mismatch RuntimeError, the official file a ValueError."""
    from modeling_mae.conversion.convert import mae_to_official

    source = three_class_classifier()
    if layout == "ours":
        path, options = tmp_path / "ft3", {}
        source.save_pretrained(path)
    else:  # the official file does not carry the head count of a width no official model has
        path, options = tmp_path / "ft3.pth", {"num_attention_heads": 4}
        torch.save({"model": mae_to_official(source)}, path)
    with caplog.at_level("WARNING", logger="modeling_mae.training.model_loading"):
        model = finetune_model(path, num_labels=5, **options)
    assert (model.classifier.out_features, model.config.num_labels) == (5, 5)
    assert model.config.id2label[4] == "class4"
    assert model.classifier.weight.std() < 1e-3  # newly initialised: trunc normal, std 2e-5
    expected = source.mae.state_dict()
    for name, tensor in model.mae.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    lines = [r.getMessage() for r in caplog.records if "NEW classification head" in r.getMessage()]
    assert lines == [f"NEW classification head: {path} has a 3-class head, this model has num_labels=5; the encoder "
                     f"is the checkpoint's, the head is newly initialised (train it before use)"]


def test_the_same_label_count_keeps_the_head(tmp_path, caplog):
    source = three_class_classifier()
    source.save_pretrained(tmp_path / "ft3")
    with caplog.at_level("WARNING", logger="modeling_mae.training.model_loading"):
        model = finetune_model(tmp_path / "ft3", num_labels=3)
    torch.testing.assert_close(model.classifier.weight, source.classifier.weight, rtol=0, atol=0)
    assert not [r for r in caplog.records if "NEW classification head" in r.getMessage()]


# --------------------------------------------------------------------------------------------------
# What `--help` says about pretraining's weight decay is what the optimizer groups do
# --------------------------------------------------------------------------------------------------
# Parameter kinds a help text may name, by their names in MAEForPreTraining.
PARAMETER_KINDS = {
    "token": lambda name: name.endswith(("cls_token", "mask_token")),
    "bias": lambda name: name.endswith(".bias"),
    "norm": lambda name: "norm" in name.rsplit(".", 1)[0] and name.endswith(".weight"),
    "position": lambda name: name.endswith(("position_embeddings", "decoder_pos_embed")),
}


def test_pretrain_weight_decay_help_says_what_the_groups_do(pretrain):
    """The groups of `pretraining_param_groups` (the official timm rule: no decay for 1-D tensors and
    `.bias`, frozen tables left out): each kind of parameter is where the help puts it. Before, the help
    listed the tokens as not decayed while the CLS and mask tokens are decayed."""
    from modeling_mae.training.optim import pretraining_param_groups

    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny"))
    decayed, not_decayed = pretraining_param_groups(model, weight_decay=0.05)
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.05, 0.0)
    where = {id(p): "decayed" for p in decayed["params"]} | {id(p): "not decayed" for p in not_decayed["params"]}
    placement = {}
    for kind, matches in PARAMETER_KINDS.items():
        places = {where.get(id(param), "frozen") for name, param in model.named_parameters() if matches(name)}
        assert len(places) == 1, (kind, places)  # a kind is treated one way
        placement[kind] = places.pop()
    assert placement == {"token": "decayed", "bias": "not decayed", "norm": "not decayed", "position": "frozen"}

    help_text = next(f for f in dataclasses.fields(pretrain.PretrainConfig) if f.name == "weight_decay").metadata["help"]
    decayed_part, _, rest = help_text.partition("not on")
    not_decayed_part, _, frozen_part = rest.partition(";")
    said = {"decayed": decayed_part, "not decayed": not_decayed_part, "frozen": frozen_part}
    for kind, place in placement.items():
        assert kind in said[place], (kind, place, help_text)
        assert all(kind not in text for other, text in said.items() if other != place), (kind, help_text)
    assert "frozen" in frozen_part
