"""k-nearest-neighbour evaluation of an MAE encoder's features, the protocol of DINO (Caron et al. 2021,
`eval_knn.py`): "is my pretraining learning anything?" answered on labelled images, without training a head.

    bank = encoder_features(model, bank_pixels)          # {"cls": (N, D), "mean": (N, D)}, unmasked encoder
    query = encoder_features(model, query_pixels)
    scores = knn_scores(query["cls"], bank["cls"], bank_labels, num_classes, k=20, temperature=0.07)  # (Q, C)
    knn_accuracy(scores, query_labels)                    # {"top1": ..., "top5": ...} in %

The steps, as DINO takes them:
1. features are L2-normalised (cosine similarity = dot product);
2. each query's `k` most similar bank features are its neighbours;
3. a neighbour votes for its class with weight exp(similarity / temperature);
4. the class with the largest sum of votes is the prediction (top-5: the five largest). Equal sums go to
   the lower class index (a stable sort), so a prediction never depends on the hardware.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def knn_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Temperature-weighted votes of the `k` nearest bank features: (Q, D), (N, D), (N,) -> (Q, C) float32.

    Similarities are cosine (both sides L2-normalised here, in float32); fewer than `k` bank features
    means every one votes. Queries go in chunks of `chunk_size` so that (Q, N) never has to fit at once."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"the bank has {bank.shape[0]} features but {bank_labels.shape[0]} labels")
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.long().to(bank.device)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[start:start + chunk_size].float().to(bank.device), dim=1)
        similarity, index = (q @ bank.T).topk(k, dim=1)  # (q, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[index], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def predictions(scores: torch.Tensor, top: int = 1) -> torch.Tensor:
    """(Q, C) votes -> (Q, top) class ids, largest first; equal votes: the lower class id first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :top]


def knn_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in % of (Q, C) votes against (Q,) labels; top-k for k >= C is left out (always 100)."""
    labels = labels.long().to(scores.device)
    num_classes = scores.shape[1]
    out = {}
    for top in topk:
        if top > 1 and top >= num_classes:
            continue
        hit = (predictions(scores, top) == labels[:, None]).any(dim=1)
        out[f"top{top}"] = 100.0 * hit.float().mean().item() if len(labels) else float("nan")
    return out


@torch.no_grad()
def encoder_features(encoder, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unmasked encoder's features of (B, C, H, W) normalised images: {"cls": (B, D), "mean": (B, D)}.

    `encoder` is an `MAEModel` (a pretraining model's `.mae`): every patch is encoded (no noise is drawn,
    so the global RNG that drives the training masks is untouched); "cls" is the final-norm CLS token,
    "mean" the mean of the final-norm patch tokens."""
    hidden = encoder(pixel_values, return_dict=True).last_hidden_state
    return {"cls": hidden[:, 0], "mean": hidden[:, 1:].mean(dim=1)}
