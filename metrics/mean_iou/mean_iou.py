"""Mean IoU for semantic segmentation as an `evaluate` metric module, loadable offline by path.

    import evaluate
    metric = evaluate.load("metrics/mean_iou")          # a directory holding this file
    metric.compute(predictions=pred_maps, references=label_maps, num_labels=150, ignore_index=255)
    # {'mean_iou': ..., 'mean_accuracy': ..., 'overall_accuracy': ...,
    #  'per_category_iou': array(150), 'per_category_accuracy': array(150),
    #  'aAcc': ..., 'mIoU': ..., 'mAcc': ...}   # the same three in percent, as mmsegmentation reports them

The interface and the numbers are those of the Hub's `evaluate-metric/mean_iou` (itself mmseg's):
areas are summed over the whole dataset before dividing (not averaged per image), classes absent from
both prediction and reference give NaN and are left out of the means. Written anew so that it works
without network access. `intersect_and_union` / `total_intersect_and_union` / `metrics_from_areas`
are the steps, usable on their own.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Intersection over union (Jaccard index) per class, pixel areas summed over all images:
IoU_c = |pred == c AND label == c| / |pred == c OR label == c|. mean_iou is the mean over classes
that occur (in the predictions or the references), mean_accuracy the mean over classes of
|pred == c AND label == c| / |label == c|, overall_accuracy the fraction of labelled pixels predicted
correctly. Pixels whose reference is `ignore_index` count nowhere.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays): predicted class map of each image.
    references (`list` of 2-D integer arrays): ground-truth map of each image, same shape as its prediction.
    num_labels (`int`): number of classes; predicted or reference values outside [0, num_labels) count
        nowhere (like the Hub metric's histogram range).
    ignore_index (`int`): reference value to ignore (255 for ADE20K after label reduction).
    nan_to_num (`float`, *optional*): replace NaN (classes absent everywhere) by this value in the results.
    label_map (`dict`, *optional*): old id -> new id, applied to the references first.
    reduce_labels (`bool`, defaults to `False`): ADE20K's convention for references that use 0 for
        "other / background": 0 becomes 255 and every other class id c becomes c - 1. Use it with
        `ignore_index=255`.
Returns:
    dict with `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats in [0, 1]), `per_category_iou`,
    `per_category_accuracy` (arrays of length num_labels), and `aAcc`, `mIoU`, `mAcc`: overall accuracy,
    mean IoU and mean accuracy in percent, the columns of mmsegmentation's result tables.
Examples:
    >>> metric = evaluate.load("metrics/mean_iou")
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2,
    ...                ignore_index=255)["mean_iou"]
    0.5
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
    author = {{MMSegmentation Contributors}},
    license = {Apache-2.0},
    month = {7},
    title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
    url = {https://github.com/open-mmlab/mmsegmentation},
    year = {2020}
}"""


def reduce_reference_labels(label: np.ndarray) -> np.ndarray:
    """ADE20K's reduce-labels: 0 ("other") -> 255, class c -> c - 1 (255 stays 255)."""
    label = label.astype(np.int64)
    return np.where(label == 0, 255, np.where(label == 255, 255, label - 1))


def intersect_and_union(
    pred: np.ndarray,
    label: np.ndarray,
    num_labels: int,
    ignore_index: int,
    label_map: dict | None = None,
    reduce_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel areas of one image.

    Args:
        pred / label: (H, W) integer maps.
    Returns:
        (num_labels,) int64 areas of intersection, union, prediction and reference.
    """
    pred = np.asarray(pred).astype(np.int64)
    label = np.asarray(label).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction and reference must have the same shape, got {pred.shape} and {label.shape}")
    if label_map:
        mapped = label.copy()
        for old_id, new_id in label_map.items():
            mapped[label == old_id] = new_id
        label = mapped
    if reduce_labels:
        label = reduce_reference_labels(label)

    keep = label != ignore_index
    pred, label = pred[keep], label[keep]

    def area(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < num_labels)]
        return np.bincount(values, minlength=num_labels).astype(np.int64)

    area_intersect = area(pred[pred == label])
    area_pred = area(pred)
    area_label = area(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def total_intersect_and_union(predictions, references, num_labels, ignore_index, label_map=None, reduce_labels=False):
    """Areas summed over all images: four (num_labels,) int64 arrays."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    totals = [np.zeros(num_labels, dtype=np.int64) for _ in range(4)]
    for pred, label in zip(predictions, references):
        parts = intersect_and_union(pred, label, num_labels, ignore_index, label_map, reduce_labels)
        for total, part in zip(totals, parts):
            total += part
    return tuple(totals)


def metrics_from_areas(total_intersect, total_union, total_pred, total_label, nan_to_num=None) -> dict:
    """mean IoU, mean accuracy, overall accuracy and the per-class values from summed areas."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_intersect / total_union
        acc = total_intersect / total_label
        overall = total_intersect.sum() / total_label.sum()
    results = {
        "mean_iou": float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if not np.all(np.isnan(acc)) else float("nan"),
        "overall_accuracy": float(overall),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }
    # mmsegmentation's names and unit (percent), as its result tables and the papers' mIoU report them
    results.update(aAcc=100.0 * results["overall_accuracy"], mIoU=100.0 * results["mean_iou"],
                   mAcc=100.0 * results["mean_accuracy"])
    if nan_to_num is not None:
        results = {key: _replace_nan(value, nan_to_num) for key, value in results.items()}
    return results


def _replace_nan(value, fill: float):
    if isinstance(value, np.ndarray):
        return np.nan_to_num(value, nan=fill)
    return fill if np.isnan(value) else value


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {  # (height, width) maps; uint16 holds 255 and up to 65535 classes
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://github.com/open-mmlab/mmsegmentation"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
    ):
        if not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        areas = total_intersect_and_union(
            predictions, references, int(num_labels), ignore_index, label_map, reduce_labels
        )
        return metrics_from_areas(*areas, nan_to_num=nan_to_num)
