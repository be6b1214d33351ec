"""k-nearest-neighbour evaluation of an MAE encoder's features, the protocol of DINO (Caron et al. 2021,
`eval_knn.py`): "is my pretraining learning anything?" answered on labelled images, without training a head.

    bank = encoder_features(model.mae, bank_pixels)      # {"cls": (N, D), "mean": (N, D)}, unmasked encoder
    query = encoder_features(model.mae, query_pixels)
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

from dataclasses import dataclass

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


# --------------------------------------------------------------------------------------------------
# The evaluation set and the evaluation during pretraining
# --------------------------------------------------------------------------------------------------
@dataclass
class LabelledImages:
    """A fixed labelled sample for k-NN evaluation, decoded once with the evaluation transform and kept in
    memory: this process's share of it, uint8 (N, 3, H, W) for photographs or float (N, C, H, W) for other
    pixel formats, and labels numbered by class (the same numbers in the bank and the queries)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    total: int  # examples drawn, over all processes
    skipped: int  # undecodable ones among this process's share
    positions: torch.Tensor | None = None  # each kept example's place in the drawn sample (gathered in that order)

    def __len__(self) -> int:
        return len(self.labels)


def _draw(name_or_dir, split, count, seed, image_column, label_column, dataset_config_name, token):
    """(examples, image column, class key of each example): `count` examples drawn at random (seed) from a
    local folder (map-style), or the first `count` of a Hub split streamed in its seeded file order (a
    memory bank never downloads a whole training split)."""
    from pathlib import Path

    import numpy as np

    from .classification_data import load_map_dataset
    from .data import load_source, prepare_source

    if Path(name_or_dir).expanduser().is_dir():
        source, image_column, label_column = load_map_dataset(
            name_or_dir, split, dataset_config_name, image_column, label_column, token=token)
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(source))[: min(count, len(source))]]
        source = source.select(order)
    else:
        stream = load_source(dataset_name=name_or_dir, dataset_config_name=dataset_config_name, split=split,
                             token=token, seed=seed)
        stream, image_column, label_column = prepare_source(stream, image_column, label_column)
        source = stream
    if label_column is None:
        raise ValueError(f"k-NN evaluation needs labels, but {name_or_dir!r} split {split!r} has no label column; "
                         f"set `eval_label_column`")
    names = getattr((source.features or {}).get(label_column), "names", None)
    examples = [source[i] for i in range(len(source))] if hasattr(source, "select") else list(source.take(count))
    keys = [names[e[label_column]] if names is not None else str(e[label_column]) for e in examples]
    return examples, image_column, keys


def _decode_share(examples, image_column, labels, image_size, pixel_format, crop_pct, positions) -> LabelledImages:
    from .data import CorruptImageError, decode_image
    from .pixels import ArrayEvalTransform, PixelFormatError, decode_array
    from .transforms import EvalTransform

    rgb = pixel_format is None or pixel_format.is_rgb8
    transform = EvalTransform(image_size, crop_pct) if rgb else ArrayEvalTransform(image_size, crop_pct)
    pixels, kept, places, skipped = [], [], [], 0
    for index, (example, label, place) in enumerate(zip(examples, labels, positions)):
        cell = example[image_column]
        try:
            if rgb:
                pixels.append(transform(decode_image(cell)))
            else:
                array = decode_array(cell)
                pixel_format.check(array, f"evaluation image {index}")
                pixels.append(transform(pixel_format.to_float(array)))
        except PixelFormatError:
            raise
        except (CorruptImageError, OSError, ValueError):
            skipped += 1
            continue
        kept.append(label)
        places.append(place)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    channels = 3 if rgb else pixel_format.num_channels
    empty = torch.zeros(0, channels, *size, dtype=torch.uint8 if rgb else torch.float32)
    return LabelledImages(torch.stack(pixels) if pixels else empty, torch.tensor(kept, dtype=torch.long), len(examples),
                          skipped, torch.tensor(places, dtype=torch.long))


def load_knn_sets(bank: tuple[str, str], queries: tuple[str, str], bank_size: int, num_queries: int, image_size,
                  pixel_format=None, crop_pct: float = 224 / 256, seed: int = 0, rank: int = 0, world_size: int = 1,
                  image_column=None, label_column=None, dataset_config_name=None, token=None):
    """The memory bank and the queries, each (name_or_dir, split): `bank_size` / `num_queries` examples of
    each split (`_draw`), every process decoding its share (examples rank, rank + world, ...), labels
    numbered by class name over both. Returns (bank, queries, class names)."""
    drawn = [_draw(name, split, count, seed + offset, image_column, label_column, dataset_config_name, token)
             for offset, ((name, split), count) in enumerate(((bank, bank_size), (queries, num_queries)))]
    classes = sorted({key for _, _, keys in drawn for key in keys})
    number = {key: i for i, key in enumerate(classes)}
    sets = []
    for examples, image_column_, keys in drawn:
        share = slice(rank, None, world_size)
        sets.append(_decode_share(examples[share], image_column_, [number[k] for k in keys[share]], image_size,
                                  pixel_format, crop_pct, list(range(len(examples)))[share]))
    return sets[0], sets[1], classes


def _gather(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """Every process's rows, in process order (shares of unequal size padded for the all-gather)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=accelerator.device)
    sizes = accelerator.gather(size).tolist()
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=accelerator.device)
    padded[: tensor.shape[0]] = tensor.to(accelerator.device)
    gathered = accelerator.gather(padded).view(len(sizes), max(sizes), *tensor.shape[1:])
    return torch.cat([gathered[i, :n] for i, n in enumerate(sizes)])


@torch.no_grad()
def images_features(encoder, images: LabelledImages, normalize, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
    """{"cls", "mean"} float32 features of `images` (this process's share), batched, on `device` under
    autocast to `dtype` (the run's precision); `normalize` maps a uint8 / float batch to the model's input."""
    out = {"cls": [], "mean": []}
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    for start in range(0, len(images), batch_size):
        batch = normalize(images.pixels[start:start + batch_size].to(device, non_blocking=True))
        with autocast:
            features = encoder_features(encoder, batch)
        for name, value in features.items():
            out[name].append(value.float())
    return {name: torch.cat(values) if values else torch.zeros(0) for name, values in out.items()}
