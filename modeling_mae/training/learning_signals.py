"""Signals that say whether pretraining learns, with no labels: the loss against a trivial predictor's on
the same batch, and how spread out (not collapsed) the encoder's features are.

    out = model(pixel_values)                                    # the training step's forward
    baseline = trivial_predictor_loss(model, pixel_values, out.mask)
    out.loss / baseline                                          # 0.41: 41 % of the trivial predictor's loss
    features = encoder_features(model.mae, pixel_values)["cls"]  # knn.encoder_features, at logging steps
    feature_spread(features), rankme(features)

The trivial predictor guesses every removed patch without looking at the visible ones: with
`norm_pix_loss` the target is each patch normalised by its own mean and variance, so the best blind guess
is the patch mean, 0 in that space (loss (n - 1) / n * var / (var + 1e-6), about 1.0); without it, the
image's own mean per channel. A loss at 100 % of it has learnt nothing; the paper's ViT-B ends near 40 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def trivial_predictor_loss(model, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pretraining loss (same target, same removed patches `mask` (N, L)) of the blind predictor:
    0 for `norm_pix_loss` (the patch mean), else each image's per-channel mean. fp32 scalar."""
    pixel_values = pixel_values.float()
    if model.config.norm_pix_loss:
        pred = torch.zeros_like(model.patchify(pixel_values))
    else:
        pred = model.patchify(pixel_values.mean(dim=(2, 3), keepdim=True).expand_as(pixel_values))
    per_patch = model.patch_loss(pixel_values, pred)  # the loss's own target (and norm_pix), (N, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)  # as forward_loss averages it


@torch.no_grad()
def feature_spread(features: torch.Tensor) -> float:
    """sqrt(D) x the mean over dimensions of the batch std of L2-normalised (B, D) features: about 1 for
    features spread over the sphere, 0 when every image maps to the same point (collapse; SimSiam's
    measure, Chen & He 2021)."""
    if features.shape[0] < 2:
        return float("nan")
    z = F.normalize(features.float(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of (B, D)
    features, the effective rank, between 1 (collapsed to a line) and min(B, D)."""
    if features.shape[0] < 2:
        return float("nan")
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


COLLAPSE_SPREAD = 0.05  # below this spread the features have collapsed: every image looks the same
