"""The k-NN classifier of pretraining's evaluation (DINO's protocol), against examples computed by hand."""

import math

import pytest
import torch

from modeling_mae.training.knn import encoder_features, knn_accuracy, knn_scores, predictions


BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # b2 has cosine 0.7071 to (1, 0)
LABELS = torch.tensor([0, 1, 1, 2])


def test_votes_are_exp_of_cosine_over_temperature_of_the_k_nearest():
    query = torch.tensor([[2.0, 0.0]])  # the norm does not matter: cosine
    scores = knn_scores(query, BANK, LABELS, num_classes=3, k=2, temperature=0.07)
    # neighbours b0 (cos 1) and b2 (cos 1/sqrt 2); b1 (cos 0) and b3 (cos -1) are not among the 2
    expected = [math.exp(1 / 0.07), math.exp(2 ** -0.5 / 0.07), 0.0]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert predictions(scores).tolist() == [[0]]


def test_the_temperature_decides_between_one_close_and_two_far_neighbours():
    query = torch.tensor([[1.0, 0.0]])
    # k=3: class 0 has b0 (cos 1), class 1 has b2 (0.7071) and b1 (0)
    sharp = knn_scores(query, BANK, LABELS, 3, k=3, temperature=0.07)
    flat = knn_scores(query, BANK, LABELS, 3, k=3, temperature=1.0)
    assert flat[0].tolist() == pytest.approx([math.e, math.exp(2 ** -0.5) + 1.0, 0.0], rel=1e-6)  # 2.718 < 3.028
    assert predictions(sharp).item() == 0 and predictions(flat).item() == 1


def test_equal_votes_go_to_the_lower_class_id_and_k_above_the_bank_size_uses_all():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    scores = knn_scores(torch.tensor([[1.0, 0.0]]), bank, torch.tensor([3, 1]), num_classes=4, k=20)
    assert scores[0, 1] == scores[0, 3] > 0
    assert predictions(scores, top=2).tolist() == [[1, 3]]


def test_accuracy_top1_and_top5_in_percent():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5], [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([5, 6])  # query 0: 5th best -> top-5 hit, not top-1; query 1: 2nd best
    assert knn_accuracy(scores, labels) == {"top1": 0.0, "top5": 100.0}
    assert knn_accuracy(scores, torch.tensor([1, 0])) == {"top1": 100.0, "top5": 100.0}
    assert knn_accuracy(scores[:, :4], torch.tensor([1, 0])) == {"top1": 100.0}  # 4 classes: no top-5


def test_chunks_give_the_same_votes():
    torch.manual_seed(0)
    query, bank, labels = torch.randn(37, 8), torch.randn(50, 8), torch.randint(0, 5, (50,))
    assert torch.allclose(knn_scores(query, bank, labels, 5, chunk_size=7), knn_scores(query, bank, labels, 5))


def test_encoder_features_are_the_unmasked_encoders_and_leave_the_rng_alone():
    from modeling_mae import MAEConfig, MAEForPreTraining

    model = MAEForPreTraining(MAEConfig.from_preset("mae-tiny")).eval()
    pixels = torch.randn(3, 3, 32, 32)
    state = torch.get_rng_state()
    features = encoder_features(model.mae, pixels)
    assert torch.equal(torch.get_rng_state(), state)
    hidden = model.mae(pixels).last_hidden_state
    assert hidden.shape[1] == 1 + model.config.num_patches  # every patch encoded
    assert torch.equal(features["cls"], hidden[:, 0]) and torch.allclose(features["mean"], hidden[:, 1:].mean(1))


class _ColourEncoder(torch.nn.Module):
    """A stand-in encoder whose CLS feature is the image's mean colour (and patch tokens its pixels)."""

    def forward(self, pixel_values, return_dict=True):
        from types import SimpleNamespace

        cls = pixel_values.mean(dim=(2, 3))[:, None]
        tokens = pixel_values.flatten(2).transpose(1, 2)[:, :4]
        return SimpleNamespace(last_hidden_state=torch.cat([cls, tokens], dim=1))


def _colour_folder(root, split, per_class, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, colour in colours.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-20, 20, (16, 16, 3))
            Image.fromarray((np.array(colour) + noise).clip(0, 255).astype("uint8")).save(folder / f"{i}.png")


def test_knn_evaluation_loads_both_splits_and_scores_the_queries(tmp_path):
    from modeling_mae.training.knn import load_knn_sets
    from modeling_mae.training.pretraining_evaluation import PretrainingMonitor
    from modeling_mae.training.transforms import normalize_on_device

    _colour_folder(tmp_path, "train", 6, 0)
    _colour_folder(tmp_path, "val", 3, 1)
    bank, queries, classes = load_knn_sets((str(tmp_path), "train"), (str(tmp_path), "validation"), 100, 100, 16)
    assert classes == ["blue", "green", "red"] and (len(bank), len(queries)) == (18, 9)
    monitor = PretrainingMonitor(bank, queries, normalize_on_device, device="cpu", batch_size=4, k=5, online_probe=True)
    results = monitor.evaluate(_ColourEncoder())
    assert results == {"knn/cls_top1": 100.0, "knn/mean_top1": 100.0, "probe/top1": 100.0}
    # two processes' shares together are the whole sample
    shares = [load_knn_sets((str(tmp_path), "train"), (str(tmp_path), "validation"), 100, 100, 16, rank=r, world_size=2)
              for r in range(2)]
    assert sorted(torch.cat([s[0].labels for s in shares]).tolist()) == sorted(bank.labels.tolist())
