"""Is my pretraining working? What pretraining measures about itself while it runs.

    monitor = PretrainingMonitor(bank, queries, normalize, ...)   # k-NN sets: knn.load_knn_sets
    monitor.evaluate(encoder)        # at step 0 and every `eval_steps`: k-NN top-1 / top-5 (CLS and mean-pooled),
                                     #   the online probe's top-1 when asked; {"knn/cls_top1": ..., ...}
    batch_signals(model, pixel_values, mask, loss)   # at logging steps, no labels: the loss against the trivial
                                     #   predictor's on the same batch, feature spread and RankMe

Nothing here draws from the global RNG or changes the model's mode for good: a run with evaluation gives
the same weights as one without (the encoder runs in eval mode, unmasked, then goes back to training).
The online probe is a BatchNorm1d(affine=False) + Linear head (the linear probe's, MAE Table 10) fitted
at each evaluation on the bank's detached CLS features (no gradient reaches the encoder), scored on the
queries: a cheap stand-in for a linear probe's trend, not its figure.
"""

from __future__ import annotations

import logging

import torch

from .knn import DEFAULT_K, DEFAULT_TEMPERATURE, LabelledImages, _gather, images_features, knn_accuracy, knn_scores
from .learning_signals import COLLAPSE_SPREAD, feature_spread, rankme, trivial_predictor_loss


logger = logging.getLogger(__name__)


class PretrainingMonitor:
    """k-NN evaluation (and the optional online probe) of the unmasked encoder on fixed labelled sets."""

    def __init__(self, bank: LabelledImages, queries: LabelledImages, normalize, *, device, dtype=torch.float32,
                 accelerator=None, batch_size: int = 256, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 online_probe: bool = False, probe_steps: int = 200, seed: int = 0):
        self.bank, self.queries, self.normalize = bank, queries, normalize
        self.device, self.dtype, self.accelerator = device, dtype, accelerator
        self.batch_size, self.k, self.temperature = batch_size, k, temperature
        self.online_probe, self.probe_steps, self.seed = online_probe, probe_steps, seed

    @torch.no_grad()
    def features(self, encoder) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
        """Gathered (bank features, query features, bank labels, query labels); features {"cls", "mean"}."""
        was_training = encoder.training
        encoder.eval()
        try:
            bank = images_features(encoder, self.bank, self.normalize, self.batch_size, self.device, self.dtype)
            queries = images_features(encoder, self.queries, self.normalize, self.batch_size, self.device, self.dtype)
        finally:
            encoder.train(was_training)
        def gather(values: torch.Tensor, images: LabelledImages) -> torch.Tensor:
            """Every process's rows, in the drawn sample's order (so 1 and N processes score alike)."""
            everything = _gather(values, self.accelerator)
            if images.positions is None:
                return everything
            return everything[torch.argsort(_gather(images.positions.to(self.device), self.accelerator))]

        return ({k: gather(v, self.bank) for k, v in bank.items()}, {k: gather(v, self.queries) for k, v in queries.items()},
                gather(self.bank.labels.to(self.device), self.bank), gather(self.queries.labels.to(self.device), self.queries))

    def evaluate(self, encoder) -> dict[str, float]:
        """{"knn/cls_top1", "knn/mean_top1" (and top5 above 5 classes), "probe/top1" with the online probe}, in %."""
        bank, queries, bank_labels, query_labels = self.features(encoder)
        num_classes = int(max(bank_labels.max(), query_labels.max()).item()) + 1
        topk = (1, 5) if num_classes > 5 else (1,)
        results = {}
        for pooling in ("cls", "mean"):
            scores = knn_scores(queries[pooling], bank[pooling], bank_labels, num_classes, self.k, self.temperature)
            for name, value in knn_accuracy(scores, query_labels, topk).items():
                results[f"knn/{pooling}_{name}"] = value
        if self.online_probe:
            logits = fit_probe(bank["cls"], bank_labels, num_classes, self.probe_steps, self.seed)(queries["cls"])
            results["probe/top1"] = knn_accuracy(logits, query_labels, (1,))["top1"]
        return results


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 200, seed: int = 0,
              lr: float = 1e-2, batch_size: int = 256):
    """A BatchNorm1d(affine=False, eps 1e-6) + Linear head fitted with AdamW on detached (N, D) features;
    returns the head in eval mode (a function (Q, D) -> (Q, C) logits). Its own seeded generator: the global
    RNG is untouched."""
    features = features.detach().float()
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(features.shape[1], affine=False, eps=1e-6),
                               torch.nn.Linear(features.shape[1], num_classes)).to(features.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=generator) * 0.01)
        head[1].bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),), generator=generator)
            index = index.to(features.device)
            loss = torch.nn.functional.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    return lambda query: head(query.float()).detach()


@torch.no_grad()
def batch_signals(model, pixel_values: torch.Tensor, mask: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
    """Label-free signals of one training micro-batch (normalised `pixel_values`, the step's `mask` (N, L)
    and `loss`): the trivial predictor's loss on the same removed patches and the loss as a share of it,
    and the spread / effective rank of the unmasked encoder's CLS features (one extra forward, no grad,
    eval mode; the model goes back to its mode). Call at logging steps only: it reads values to the host."""
    trivial = trivial_predictor_loss(model, pixel_values, mask)
    encoder = model.mae
    was_training = encoder.training
    encoder.eval()
    try:
        features = encoder(pixel_values, return_dict=True).last_hidden_state[:, 0].float()
    finally:
        encoder.train(was_training)
    spread = feature_spread(features)
    signals = {
        "train/trivial_loss": trivial.item(),
        "train/loss_vs_trivial": float(loss) / max(trivial.item(), 1e-12),
        "features/spread": spread,
        "features/rankme": rankme(features),
    }
    return signals


def collapse_warning(signals: dict) -> str | None:
    """One line when the features have collapsed (every image encoded alike), else None."""
    spread = signals.get("features/spread")
    if spread is not None and spread == spread and spread < COLLAPSE_SPREAD:
        return (f"feature collapse: the encoder's CLS features of a batch have spread {spread:.3f} (below "
                f"{COLLAPSE_SPREAD}; about 1 is healthy) and effective rank {signals.get('features/rankme', float('nan')):.1f}: "
                f"every image is encoded alike; lower the learning rate or check the data")
    return None
