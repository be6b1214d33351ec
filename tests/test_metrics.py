"""The project's `evaluate` metric module (top-k accuracy) and the distributed evaluation loop."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mae.training.evaluation import METRICS_DIR, evaluate_classifier, load_metric


# 6 examples, 6 classes. True class of each row and its rank (0 = highest score) by hand:
#   row 0: label 2, scores 0.9 > 0.5 > 0.1... -> class 2 is the best           rank 0
#   row 1: label 0, classes 1, 3 score higher                                    rank 2
#   row 2: label 5, every other class scores higher                              rank 5
#   row 3: label 4, highest                                                      rank 0
#   row 4: label 1, classes 0, 2, 3, 4 score higher                              rank 4
#   row 5: label 3, tie with class 0 (0.5 = 0.5): ties go to the lower index     rank 1
LOGITS = np.array(
    [
        [0.1, 0.2, 0.9, 0.5, 0.0, 0.3],
        [0.3, 0.8, 0.1, 0.6, 0.2, 0.0],
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        [0.0, 0.1, 0.2, 0.3, 2.0, 0.4],
        [0.9, 0.1, 0.8, 0.7, 0.6, 0.0],
        [0.5, 0.1, 0.2, 0.5, 0.3, 0.4],
    ],
    dtype=np.float32,
)
LABELS = np.array([2, 0, 5, 4, 1, 3])
# top-1: rows 0, 3 -> 2/6; top-2: + row 5 -> 3/6; top-3: + row 1 -> 4/6; top-5: + row 4 -> 5/6
EXPECTED = {"top1_accuracy": 2 / 6, "top2_accuracy": 3 / 6, "top3_accuracy": 4 / 6, "top5_accuracy": 5 / 6}


def test_metric_loads_offline_by_path_and_matches_hand_computed_values():
    metric = load_metric("top_k_accuracy")
    result = metric.compute(predictions=LOGITS, references=LABELS, k=[1, 2, 3, 5])
    assert result == pytest.approx(EXPECTED)
    # the same module through evaluate.load with a path, like a Hub metric
    import evaluate

    metric = evaluate.load(str(METRICS_DIR / "top_k_accuracy"), keep_in_memory=True)
    for start in range(0, 6, 4):  # add_batch accumulates like the Hub metrics
        metric.add_batch(predictions=LOGITS[start : start + 4], references=LABELS[start : start + 4])
    assert metric.compute(k=5) == pytest.approx({"top5_accuracy": 5 / 6})
    assert metric.compute(predictions=LOGITS, references=LABELS, k=1, normalize=False) == {"top1_accuracy": 2}


def test_metric_rejects_bad_k_and_labels():
    metric = load_metric("top_k_accuracy")
    with pytest.raises(ValueError, match="k must be in"):
        metric.compute(predictions=LOGITS, references=LABELS, k=7)
    with pytest.raises(ValueError, match="class ids"):
        metric.compute(predictions=LOGITS, references=np.array([0, 1, 2, 3, 4, 6]), k=1)


# ---- the evaluation loop, on 1 and on 2 processes ------------------------------------------------
NUM_EXAMPLES, NUM_CLASSES, BATCH = 13, 7, 2  # 13 examples over 2 processes x batch 2: padded last batch


def _fixed_eval_data():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(NUM_EXAMPLES, NUM_CLASSES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (NUM_EXAMPLES,), generator=generator)
    return logits, labels


UNREADABLE = (3, 12)  # examples that come as placeholders (index used -1): dropped and counted


def _expected_eval(logits, labels):
    """By hand, over the readable examples: rank of the true class, the mean cross-entropy, and per
    class [correct, total]."""
    keep = torch.tensor([i not in UNREADABLE for i in range(NUM_EXAMPLES)])
    logits, labels = logits[keep], labels[keep]
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)
    loss = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    per_class = [[int(((ranks < 1) & (labels == c)).sum()), int((labels == c).sum())] for c in range(NUM_CLASSES)]
    return {
        "top1": 100.0 * (ranks < 1).double().mean().item(),
        "top5": 100.0 * (ranks < 5).double().mean().item(),
        "loss": loss,
        "num_examples": NUM_EXAMPLES - len(UNREADABLE),
        "num_unreadable": len(UNREADABLE),
        "per_class": per_class,
    }


def _assert_eval(result, expected):
    expected = dict(expected)
    assert result.pop("per_class") == expected.pop("per_class")
    assert result == pytest.approx(expected)


def _run_eval(out_dir):
    """Each process: the loop over a prepared DataLoader whose "images" index the fixed logits."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fork inherits the parent's singleton state
    accelerator = Accelerator(cpu=True)
    logits, labels = _fixed_eval_data()
    ids = torch.arange(NUM_EXAMPLES)
    used = torch.tensor([-1 if i in UNREADABLE else i for i in range(NUM_EXAMPLES)])
    data = torch.utils.data.TensorDataset(ids, labels, used, ids)
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=BATCH))
    result = evaluate_classifier(lambda index: logits[index], loader, accelerator, NUM_CLASSES)
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    AcceleratorState._reset_state(reset_partial_state=True)


def test_evaluation_loop_single_process(tmp_path):
    _run_eval(tmp_path)
    result = json.loads((tmp_path / "rank0.json").read_text())
    expected = _expected_eval(*_fixed_eval_data())
    _assert_eval(result, expected)


def test_evaluation_loop_two_processes_counts_every_example_once(tmp_path):
    # Two real processes (torchrun + gloo), started fresh: a fork of this pytest process could inherit
    # a busy OpenMP pool from earlier tests and hang.
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = _expected_eval(*_fixed_eval_data())
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 13 examples on 2 processes x batch 2 means 16 slots: the 3 padded duplicates are not counted, and
    # the 2 unreadable placeholders are dropped after the gather and counted once
    for result in results:
        _assert_eval(result, expected)
    assert not math.isclose(expected["top1"], 0.0)


if __name__ == "__main__":  # one process of the 2-process test above
    import sys

    _run_eval(sys.argv[1])
    # leave together and close the process group before exit: a rank exiting while gloo's threads still
    # run can abort ("terminate called without an active exception", seen once in CI)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
