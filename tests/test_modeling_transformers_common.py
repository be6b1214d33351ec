"""transformers' own common model tests, run on our classes (issue 11, point 6).

The test classes below mix in the INSTALLED transformers version's `ModelTesterMixin`, `ConfigTester` and
`BackboneTesterMixin`, fetched from its source distribution and cached (see `transformers_test_sources`),
following the tester pattern of transformers' tests/models/vit_mae/test_modeling_vit_mae.py: a small tester
object with a tiny config (image 30, patch 2, hidden 32, 2 blocks) and `prepare_config_and_inputs_for_common`.

Every test transformers' mixins define either passes or is skipped here with a one-line reason below.
The module is skipped as a whole, with the reason, when the sdist cannot be fetched or imported.
"""

from __future__ import annotations

import contextlib
import math
import unittest

import pytest
import torch
from torch import nn
from transformers.models.auto import modeling_auto

import transformers_test_sources
from modeling_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from modeling_mae.modeling_mae_backbone import MAEBackbone


try:
    ModelTesterMixin, ConfigTester, BackboneTesterMixin, common = transformers_test_sources.load()
except transformers_test_sources.Unavailable as err:
    pytest.skip(str(err), allow_module_level=True)

floats_tensor, ids_tensor = common.floats_tensor, common.ids_tensor

# Tiny models run fastest on one thread, and the machine running the suite is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


class MAEModelTester:
    """Tiny MAE in the shape of transformers' `ViTMAEModelTester` (image 30, patch 2, hidden 32, 2 blocks);
    batch 4 instead of 13 keeps the file's CPU time down (the batching test still splits a batch)."""

    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=30,
        patch_size=2,
        num_channels=3,
        is_training=True,
        use_labels=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        type_sequence_label_size=10,
        initializer_range=0.02,
        mask_ratio=0.5,
        out_features=("stage1", "stage2"),
        masked=False,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.mask_ratio = mask_ratio
        self.out_features = list(out_features)
        self.num_patches = (image_size // patch_size) ** 2
        # MAEModel does not mask unless asked: every patch + CLS. MAEForPreTraining keeps L * (1 - ratio).
        self.num_visible = int(self.num_patches * (1 - mask_ratio))
        self.seq_length = 1 + (self.num_visible if masked else self.num_patches)

    def get_config(self) -> MAEConfig:
        return MAEConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range,
            mask_ratio=self.mask_ratio,
            decoder_hidden_size=self.hidden_size,
            decoder_num_hidden_layers=self.num_hidden_layers,
            decoder_num_attention_heads=self.num_attention_heads,
            decoder_intermediate_size=self.intermediate_size,
            num_labels=self.type_sequence_label_size,
            out_features=self.out_features,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    # ---- model-specific checks (as transformers' testers have) -------------------------------------
    def create_and_check_model(self, config, pixel_values, labels):
        model = MAEModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def create_and_check_for_pretraining(self, config, pixel_values, labels):
        model = MAEForPreTraining(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        patch_dim = self.patch_size**2 * self.num_channels
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_patches, patch_dim))
        self.parent.assertEqual(result.mask.shape, (self.batch_size, self.num_patches))
        self.parent.assertEqual(int(result.mask[0].sum()), self.num_patches - self.num_visible)

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = MAEForImageClassification(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        self.parent.assertEqual(result.loss.shape, ())

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = MAEBackbone(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        grid = self.image_size // self.patch_size
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        for feature_map in result.feature_maps:
            self.parent.assertEqual(feature_map.shape, (self.batch_size, self.hidden_size, grid, grid))
        self.parent.assertEqual(model.channels, [self.hidden_size] * len(config.out_features))


@contextlib.contextmanager
def as_shipped_in_transformers():
    """List our classes in transformers' name mappings for model type "mae", as a model shipped in
    transformers is listed. The common tests pick base models, heads with a loss and backbones by these
    names (which tests train, which get labels, which check `base_model_prefix`); unlisted, our classes
    would be treated as none of them and those checks would silently not run."""
    entries = [
        (modeling_auto.MODEL_MAPPING_NAMES, "MAEModel"),
        (modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES, "MAEForPreTraining"),
        (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "MAEForImageClassification"),
        (modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES, "MAEBackbone"),
    ]
    model_type = MAEConfig.model_type
    for mapping, name in entries:
        if mapping.get(model_type, name) != name:
            raise RuntimeError(f"transformers already maps model type {model_type!r} to {mapping[model_type]}")
        mapping[model_type] = name
    try:
        yield
    finally:
        for mapping, _ in entries:
            mapping.pop(MAEConfig.model_type, None)


# One reason per skipped test, kept here so the list can be read (and reported) in one place.
SKIPS = {
    "test_inputs_embeds": "MAE takes pixel_values only, no inputs_embeds (as transformers' ViTMAE)",
    "test_inputs_embeds_matches_input_ids": "MAE takes pixel_values only, no input_ids / inputs_embeds",
    "test_model_get_set_embeddings": "image model: no token embeddings to set; replaced by test_patch_embeddings_are_the_input_embeddings",
}


def _skip_known(cls):
    for name, reason in SKIPS.items():
        setattr(cls, name, unittest.skip(reason)(lambda self: None))
    return cls


class _MAECommonTest(ModelTesterMixin):
    test_resize_embeddings = False
    test_torch_exportable = False  # the sdist has no tests/exporters: nothing to run (see transformers_test_sources)
    # transformers runs this check for models whose file's copyright year is 2023 or later, older ones
    # only once fixed; our files carry no such line (year 0 to the test), and the check applies to us.
    test_can_init_all_missing_weights_before_2023 = True
    has_attentions = True
    model_tester_kwargs: dict = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.enterClassContext(as_shipped_in_transformers())

    def setUp(self):
        self.model_tester = MAEModelTester(self, **self.model_tester_kwargs)
        self.config_tester = ConfigTester(self, config_class=MAEConfig, has_text_modality=False, hidden_size=36)

    def test_patch_embeddings_are_the_input_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIsInstance(model.get_input_embeddings().projection, nn.Conv2d)
            self.assertIsNone(model.get_output_embeddings())


@_skip_known
class MAEModelTest(_MAECommonTest, unittest.TestCase):
    """`ModelTesterMixin` on the encoder, the classifier and the backbone (no masking: 1 + L tokens)."""

    all_model_classes = (MAEModel, MAEForImageClassification, MAEBackbone)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())


@_skip_known
class MAEForPreTrainingTest(_MAECommonTest, unittest.TestCase):
    """`ModelTesterMixin` on the pretraining model: the encoder sees 1 + L / 2 tokens (mask ratio 0.5)."""

    all_model_classes = (MAEForPreTraining,)
    model_tester_kwargs = {"masked": True}

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """transformers' inputs plus a fixed masking `noise` (a seeded `torch.rand`, one row per image):
        the mask is then reproducible, so the determinism, batching and output-equivalence tests run on
        the pretraining model too (transformers' ViTMAE tester skips them instead)."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        generator = torch.Generator().manual_seed(7)
        batch = inputs_dict["pixel_values"].shape[0]
        inputs_dict["noise"] = torch.rand(batch, self.model_tester.num_patches, generator=generator)
        return inputs_dict

    def test_for_pretraining(self):
        self.model_tester.create_and_check_for_pretraining(*self.model_tester.prepare_config_and_inputs())


class MAEBackboneTest(BackboneTesterMixin, unittest.TestCase):
    """`BackboneTesterMixin` on `MAEBackbone` (no pyramid: one map per selected stage, any stages)."""

    all_model_classes = (MAEBackbone,)
    config_class = MAEConfig
    has_attentions = True

    def setUp(self):
        self.model_tester = MAEModelTester(self)


def test_tiny_tester_sizes():
    """The tester's sequence sizes, by hand: 15 x 15 patches + CLS; half of them visible in pretraining."""
    tester = MAEModelTester(None)
    assert tester.num_patches == 225 and tester.seq_length == 226 and tester.num_visible == 112
    assert MAEModelTester(None, masked=True).seq_length == 113  # = ceil(0.5 * 226), transformers' ViTMAE formula
    assert math.isclose(tester.mask_ratio, 0.5)
