"""Label-free signals of pretraining, against values computed by hand."""

import math

import pytest
import torch

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.training.learning_signals import feature_spread, rankme, trivial_predictor_loss


def _model(norm_pix_loss: bool) -> MAEForPreTraining:
    return MAEForPreTraining(MAEConfig.from_preset("mae-tiny", norm_pix_loss=norm_pix_loss))  # 32 px, patch 4, 3 ch


def test_trivial_loss_with_norm_pix_is_n_minus_1_over_n_of_the_normalised_variance():
    model = _model(True)
    pixels = torch.randn(2, 3, 32, 32) * 3
    mask = (torch.rand(2, 64) < 0.75).float()
    patches = model.patchify(pixels)  # (2, 64, 48)
    n = patches.shape[-1]
    var = patches.var(dim=-1)  # unbiased, as normalize_target
    per_patch = (n - 1) / n * var / (var + 1e-6)
    expected = (per_patch * mask).sum() / mask.sum()
    assert trivial_predictor_loss(model, pixels, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx(47 / 48, abs=1e-4)  # patch 4 x 4 x 3 channels: n = 48


def test_trivial_loss_without_norm_pix_predicts_each_images_channel_mean():
    model = _model(False)
    pixels = torch.ones(1, 3, 32, 32)
    pixels[..., 16:] = -1.0  # image mean 0 in every channel: every pixel is 1 away from it
    pixels[:, 1] += 5.0  # another mean in channel 1, same spread
    mask = torch.ones(1, 64)
    assert trivial_predictor_loss(model, pixels, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_feature_spread_is_one_for_orthogonal_features_and_zero_when_collapsed():
    assert feature_spread(torch.eye(4) * 3) == pytest.approx(1.0, abs=1e-6)  # per dim: std of (1,0,0,0) = 0.5
    assert feature_spread(torch.ones(8, 4)) == pytest.approx(0.0, abs=1e-6)


def test_rankme_counts_the_effective_rank():
    assert rankme(torch.eye(4)) == pytest.approx(4.0, rel=1e-4)  # four equal singular values: exp(ln 4)
    line = torch.arange(1.0, 9.0)[:, None] * torch.tensor([[1.0, 2.0, 3.0]])
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    two = torch.diag(torch.tensor([3.0, 1.0]))  # p = 3/4, 1/4
    assert rankme(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4)


def test_batch_signals_leave_the_model_and_the_rng_as_they_were():
    from modeling_mae.training.pretraining_evaluation import batch_signals, collapse_warning

    model = _model(True).train()
    pixels = torch.randn(4, 3, 32, 32)
    out = model(pixels)
    state = torch.get_rng_state()
    signals = batch_signals(model, pixels, out.mask, out.loss)
    assert torch.equal(torch.get_rng_state(), state) and model.training and model.mae.training
    assert signals["train/loss_vs_trivial"] == pytest.approx(out.loss.item() / signals["train/trivial_loss"], rel=1e-6)
    assert 0 < signals["features/spread"] and 1 <= signals["features/rankme"] <= 4
    assert collapse_warning(signals) is None
    assert "feature collapse" in collapse_warning({"features/spread": 0.01, "features/rankme": 1.0})
