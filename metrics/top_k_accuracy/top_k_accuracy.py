"""Top-k accuracy as an `evaluate` metric module, loadable offline by path.

    import evaluate
    metric = evaluate.load("metrics/top_k_accuracy")            # a directory holding this file
    metric.compute(predictions=logits, references=labels, k=[1, 5])
    # {'top1_accuracy': 0.75, 'top5_accuracy': 1.0}

Unlike the Hub's `accuracy` (which takes predicted class ids), top-k needs the scores: each
prediction is the row of class scores (logits or probabilities, any monotonic transform) of one
example. In a distributed loop, gather first with `accelerator.gather_for_metrics` (which drops the
padded duplicates of the last batch), then `add_batch` the gathered tensors.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose true class is among the k highest-scoring classes.
Top-1 accuracy is the usual accuracy. Ties are broken by class index (lowest first), as `np.argsort`
with a stable sort of the negated scores does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape (N, num_classes)): class scores (logits or probabilities).
    references (`list` of `int`, shape (N,)): true class ids.
    k (`int` or `list` of `int`, defaults to `[1, 5]`): the k values to report; each must be >= 1 and
        at most num_classes.
    normalize (`bool`, defaults to `True`): return a fraction; with `False`, the number of hits.
Returns:
    dict with one key per k, `top{k}_accuracy`.
Examples:
    >>> metric = evaluate.load("metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 0], k=[1, 2])
    {'top1_accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5), normalize=True):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be (N, num_classes) scores for N = {labels.shape[0]} references, "
                f"got shape {scores.shape}"
            )
        num_classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"references must be class ids in [0, {num_classes}), got {labels.min()}..{labels.max()}")
        ks = [k] if isinstance(k, (int, np.integer)) else list(k)
        for value in ks:
            if not 1 <= value <= num_classes:
                raise ValueError(f"k must be in [1, num_classes={num_classes}], got {value}")
        # rank of the true class = number of classes scoring strictly higher, plus the tied ones before it
        true_scores = scores[np.arange(len(labels)), labels][:, None]
        higher = (scores > true_scores).sum(axis=1)
        tied_before = ((scores == true_scores) & (np.arange(num_classes)[None, :] < labels[:, None])).sum(axis=1)
        rank = higher + tied_before  # 0 = top-1
        results = {}
        for value in ks:
            hits = int((rank < value).sum())
            results[f"top{value}_accuracy"] = hits / max(len(labels), 1) if normalize else hits
        return results
