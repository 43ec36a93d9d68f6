"""Segmentation metrics: confusion-matrix mIoU, instance AP, panoptic quality.

Pure numpy, no file I/O (docs/ALGORITHMS.md §1.7, §3). Class ids follow the project:
0 background, 1..C foreground, 255 ignore/void. Every `num_classes` below counts the
background too (C + 1), like the confusion matrix. Summaries are JSON-friendly: plain
floats, with None where a value is undefined (NaN).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from wsseg.class_ids import IGNORE

COCO_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())  # 0.50:0.05:0.95


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (not a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return list(class_names)


# ---------------------------------------------------------------- semantic segmentation


class ConfusionMatrix:
    """A (C+1)×(C+1) pixel confusion matrix accumulated over a dataset.

    `matrix[t, p]` counts pixels of true class t predicted as p. Target pixels equal
    to 255 are ignored. Predicted values outside 0..C (e.g. 255 or -1) are counted as
    wrong: in `missed[t]`, a miss of class t that is no other class's false positive.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes  # including background
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Add one image. prediction, target: (H, W) int arrays of class ids."""
        prediction = np.asarray(prediction)
        target = np.asarray(target)
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {prediction.shape} differs from target shape {target.shape}"
            )
        target = target.reshape(-1).astype(np.int64)
        prediction = prediction.reshape(-1).astype(np.int64)
        labelled = target != IGNORE
        target, prediction = target[labelled], prediction[labelled]
        if target.size and (target.min() < 0 or target.max() >= self.num_classes):
            bad = target[(target < 0) | (target >= self.num_classes)][0]
            raise ValueError(
                f"target holds class {bad}, outside 0..{self.num_classes - 1} and not {IGNORE}:"
                " check num_classes and the label files"
            )
        valid = (prediction >= 0) & (prediction < self.num_classes)
        n = self.num_classes
        self.matrix += np.bincount(
            target[valid] * n + prediction[valid], minlength=n * n
        ).reshape(n, n)
        self.missed += np.bincount(target[~valid], minlength=n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix
        self.missed += other.missed
        return self

    def _counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true positives, target pixels, predicted pixels) per class, float64."""
        tp = np.diag(self.matrix).astype(np.float64)
        target = self.matrix.sum(axis=1) + self.missed
        predicted = self.matrix.sum(axis=0)
        return tp, target.astype(np.float64), predicted.astype(np.float64)

    def iou(self) -> np.ndarray:
        """(C+1,) float64 IoU = TP / (target + predicted − TP); NaN for a class in neither."""
        tp, target, predicted = self._counts()
        union = target + predicted - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """{"miou", "pixel_accuracy", "mean_class_accuracy", "per_class_iou": {name: iou}}.

        Means are over the classes that occur (in target or prediction for IoU, in the
        target for class accuracy); undefined values are None.
        """
        names = _names(class_names, self.num_classes)
        tp, target, _ = self._counts()
        iou = self.iou()
        with np.errstate(divide="ignore", invalid="ignore"):
            class_accuracy = np.where(target > 0, tp / target, np.nan)
        total = target.sum()
        return {
            "miou": _json_float(_nanmean(iou)),
            "pixel_accuracy": _json_float(tp.sum() / total if total > 0 else np.nan),
            "mean_class_accuracy": _json_float(_nanmean(class_accuracy)),
            "per_class_iou": {name: _json_float(v) for name, v in zip(names, iou)},
        }


def best_background_threshold(
    images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Sequence[float],
    num_classes: int,
) -> dict[str, Any]:
    """Evaluate CAMs at several background thresholds in one pass over the images.

    images: per image a tuple (cam, keys, target): cam (K, H, W) float scores of the
    image's present classes (make-cam's `high_res`, each channel max-normalised), keys
    (K,) int 0-based foreground ids (class id = key + 1), target (H, W) int ground
    truth with 255 ignored. K may be 0 (then every pixel is background).
    thresholds: background plane values to try (IRN: 0.15; sweep 0.05–0.60).
    num_classes: including background (C + 1).

    A pixel is labelled as IRN does it: prepend a constant plane t, argmax. np.argmax
    takes the first maximum, so a tie goes to background: foreground iff max cam > t.

    Returns {"thresholds": [...], "miou": [...] (None if undefined), "matrices":
    [ConfusionMatrix per threshold], "best_threshold", "best_miou"} (the first
    threshold of the highest mIoU).
    """
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds is empty")
    matrices = [ConfusionMatrix(num_classes) for _ in thresholds]
    for cam, keys, target in images:
        cam = np.asarray(cam)
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        target = np.asarray(target)
        if cam.ndim != 3 or cam.shape[0] != keys.size or cam.shape[1:] != target.shape:
            raise ValueError(
                f"cam {cam.shape}, keys {keys.shape} and target {target.shape} do not agree:"
                " expected (K, H, W), (K,) and (H, W)"
            )
        if keys.size == 0:
            for matrix in matrices:
                matrix.update(np.zeros(target.shape, dtype=np.int64), target)
            continue
        best_score = cam.max(axis=0)
        best_class = keys[cam.argmax(axis=0)] + 1
        for threshold, matrix in zip(thresholds, matrices):
            matrix.update(np.where(best_score > threshold, best_class, 0), target)
    mious = [_nanmean(m.iou()) for m in matrices]
    scored = [(-1.0 if np.isnan(v) else v) for v in mious]
    best = int(np.argmax(scored))
    return {
        "thresholds": thresholds,
        "miou": [_json_float(v) for v in mious],
        "matrices": matrices,
        "best_threshold": thresholds[best],
        "best_miou": _json_float(mious[best]),
    }


# ---------------------------------------------------------------- instance segmentation


def _mask_stack(masks: np.ndarray, count: int, what: str) -> np.ndarray:
    """(count, H, W) bool from a mask stack or an (H, W) id map (id k+1 is instance k)."""
    masks = np.asarray(masks)
    if masks.ndim == 3:
        if masks.shape[0] != count:
            raise ValueError(f"{what}: {masks.shape[0]} masks but {count} classes")
        return masks.astype(bool)
    if masks.ndim == 2:
        return masks[None] == np.arange(1, count + 1)[:, None, None]
    raise ValueError(f"{what}: masks must be (M, H, W) or an (H, W) id map, got {masks.shape}")


def _mask_iou(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """(M, G) IoU of boolean masks (M, H, W) and (G, H, W); with `void` (H, W), those pixels
    are taken out of both masks first."""
    keep = np.ones(pred.shape[1:], dtype=bool) if void is None else ~void
    p = pred[:, keep].astype(np.float64)
    g = gt[:, keep].astype(np.float64)
    inter = p @ g.T
    union = p.sum(axis=1)[:, None] + g.sum(axis=1)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _id_map_ious(pred: np.ndarray, count: int, gt: np.ndarray, gt_count: int, void: np.ndarray | None,
                 index: int) -> tuple[np.ndarray, np.ndarray]:
    """`_mask_iou` of two id maps (id k = instance k, 1-based; other values none), without the (M, H, W)
    stacks: one joint histogram of (prediction, ground truth) ids, O(H·W) memory whatever the
    instance counts (a 2000 px image with a few hundred instances needed gigabytes as stacks).
    Returns (IoU with void pixels counted in the predictions, IoU with them removed from both)."""
    if pred.shape != gt.shape or (void is not None and void.shape != gt.shape):
        raise ValueError(f"image {index}: prediction, ground truth and void differ in size")
    p = np.where((pred >= 1) & (pred <= count), pred, 0).astype(np.int64).ravel()
    g = np.where((gt >= 1) & (gt <= gt_count), gt, 0).astype(np.int64).ravel()
    keep = np.ones(p.shape, bool) if void is None else ~np.asarray(void, bool).ravel()
    joint = np.bincount(p[keep] * (gt_count + 1) + g[keep], minlength=(count + 1) * (gt_count + 1))
    joint = joint.reshape(count + 1, gt_count + 1).astype(np.float64)
    inter = joint[1:, 1:]
    gt_area = joint[:, 1:].sum(axis=0)  # ground truth never covers void
    pred_area = np.bincount(p, minlength=count + 1)[1:].astype(np.float64)
    pred_area_kept = joint[1:, :].sum(axis=1)

    def ratio(areas: np.ndarray) -> np.ndarray:
        union = areas[:, None] + gt_area[None, :] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / union, 0.0)

    return ratio(pred_area), (ratio(pred_area) if void is None else ratio(pred_area_kept))


def _average_precision(is_tp: np.ndarray, num_gt: int) -> float:
    """Area under the interpolated PR curve (all points), detections sorted by score."""
    if num_gt == 0:
        return float("nan")
    if is_tp.size == 0:
        return 0.0
    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    recall = np.concatenate([[0.0], tp / num_gt, [1.0]])
    precision = np.concatenate([[0.0], tp / (tp + fp), [0.0]])
    # Interpolate: precision at recall r is the best precision at any recall >= r.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _class_ap(image_of: list[int], scores: list[float], ious: list[np.ndarray], num_gt: int, threshold: float) -> float:
    """One class's AP: detections in descending score order (ties keep their order); each is a
    true positive when its highest-IoU ground truth in its image reaches `threshold` and was not
    taken by an earlier detection (chainercv's rule: a duplicate is a false positive, even if
    another instance would have matched)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    taken: dict[int, np.ndarray] = {}
    is_tp = np.zeros(order.size, dtype=bool)
    for rank, d in enumerate(order):
        row = ious[d]
        if row.size == 0:
            continue
        best = int(np.argmax(row))
        if row[best] >= threshold:
            used = taken.setdefault(image_of[d], np.zeros(row.size, dtype=bool))
            is_tp[rank] = not used[best]
            used[best] = True
    return _average_precision(is_tp, num_gt)


def instance_average_precision(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truths: Sequence[tuple],
    num_classes: int,
    iou_thresholds: Sequence[float] = (0.5,),
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Instance segmentation AP per class as the weakly supervised literature computes it
    (chainercv's `eval_instance_segmentation_voc`, which IRN's AP50 of 37.7 used), and its
    COCO-style mean over IoU thresholds.

    predictions: per image (masks, classes, scores): masks (M, H, W) bool, or an
    (H, W) int id map where id k (1..M) is instance k−1 and any other value is none
    (synthesize-labels' `ids`); classes (M,) 1-based class ids; scores (M,) float.
    ground_truths: per image (masks, classes) or (masks, classes, void): masks and
    classes (G,) as above; void (H, W) bool or None: VOC's 255 object outlines.
    num_classes: including background (C + 1); classes 1..C are evaluated.

    The field's convention: void pixels are removed from the ground-truth masks only; a
    predicted mask is scored as it is, so its pixels on an outline count in its area (the
    union) and never in the intersection. Per class and IoU threshold, the class's
    detections over all images are sorted by score (descending; ties keep image order, then
    order within the image); each takes the ground-truth instance of its class in its image
    with the highest mask IoU and is a true positive if that IoU reaches the threshold and no
    earlier detection took the same instance; otherwise it is a false positive. AP is the
    area under the precision-recall curve with precision made non-increasing, summed over
    every recall step (VOC 2010+, not 11 points). A class without ground truth has no AP
    (None) and is left out of the means.

    Returns {"ap50": mean AP over classes at IoU 0.5, "ap": mean over IoU 0.50:0.05:0.95 of
    the per-threshold means (COCO's thresholds with the all-point area, not COCO's 101-point
    sampling), "per_class_ap50": {name: AP}, "ap50_void_free" and "per_class_ap50_void_free":
    the same at IoU 0.5 with void pixels removed from the predictions too (higher; not
    comparable with published numbers), and for every other threshold t in iou_thresholds
    "ap{100t}" and "per_class_ap{100t}"}. class_names: all num_classes names, background
    first; the per-class keys are those of classes 1..C (default "1".."C").
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions but {len(ground_truths)} ground truths")
    names = _names(class_names, num_classes)[1:]
    foreground = range(1, num_classes)
    report = sorted({round(float(t), 2) for t in iou_thresholds} | {0.5})
    all_thresholds = sorted(set(report) | set(COCO_IOU_THRESHOLDS))

    # Per class: the image index, score and IoU rows (to the class's GT there, with void pixels
    # counted in the prediction, and removed) of every detection, and the number of GT instances.
    det_image: dict[int, list[int]] = {c: [] for c in foreground}
    det_score: dict[int, list[float]] = {c: [] for c in foreground}
    det_iou: dict[int, list[np.ndarray]] = {c: [] for c in foreground}
    det_iou_void_free: dict[int, list[np.ndarray]] = {c: [] for c in foreground}
    gt_count = dict.fromkeys(foreground, 0)
    for index, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        pred_masks, pred_classes, scores = pred
        gt_masks, gt_classes = gt[0], gt[1]
        void = None if len(gt) < 3 or gt[2] is None else np.asarray(gt[2], dtype=bool)
        pred_classes = np.asarray(pred_classes, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        gt_classes = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
        if scores.size != pred_classes.size:
            raise ValueError(f"image {index}: {scores.size} scores for {pred_classes.size} classes")
        for what, classes in (("prediction", pred_classes), ("ground truth", gt_classes)):
            if classes.size and (classes.min() < 1 or classes.max() >= num_classes):
                raise ValueError(
                    f"image {index}: {what} classes must lie in 1..{num_classes - 1},"
                    f" got {classes.min()}..{classes.max()}"
                )
        if np.ndim(pred_masks) == 2 and np.ndim(gt_masks) == 2:  # id maps: disjoint masks, counted in one pass
            iou, iou_void_free = _id_map_ious(np.asarray(pred_masks), pred_classes.size, np.asarray(gt_masks),
                                              gt_classes.size, void, index)
        else:
            pred_stack = _mask_stack(pred_masks, pred_classes.size, f"image {index} prediction")
            gt_stack = _mask_stack(gt_masks, gt_classes.size, f"image {index} ground truth")
            if pred_stack.shape[1:] != gt_stack.shape[1:] or (
                void is not None and void.shape != gt_stack.shape[1:]
            ):
                raise ValueError(f"image {index}: prediction, ground truth and void differ in size")
            if void is not None:
                gt_stack = gt_stack & ~void  # ground truth never covers void
            iou = _mask_iou(pred_stack, gt_stack)
            iou_void_free = iou if void is None else _mask_iou(pred_stack, gt_stack, void)
        for c in np.unique(np.concatenate([pred_classes, gt_classes])):
            c = int(c)
            rows = np.flatnonzero(pred_classes == c)
            cols = np.flatnonzero(gt_classes == c)
            gt_count[c] += cols.size
            for row in rows:
                det_image[c].append(index)
                det_score[c].append(float(scores[row]))
                det_iou[c].append(iou[row, cols])
                det_iou_void_free[c].append(iou_void_free[row, cols])

    per_threshold = {t: {c: _class_ap(det_image[c], det_score[c], det_iou[c], gt_count[c], t) for c in foreground}
                     for t in all_thresholds}
    void_free = {c: _class_ap(det_image[c], det_score[c], det_iou_void_free[c], gt_count[c], 0.5) for c in foreground}

    def mean_ap(per_class: dict[int, float]) -> float:
        return _nanmean(np.array([per_class[c] for c in foreground]))

    result: dict[str, Any] = {
        "ap50": _json_float(mean_ap(per_threshold[0.5])),
        "ap": _json_float(_nanmean(np.array([mean_ap(per_threshold[t]) for t in COCO_IOU_THRESHOLDS]))),
    }
    for threshold in report:
        tag = f"{round(threshold * 100):d}"
        result[f"ap{tag}"] = _json_float(mean_ap(per_threshold[threshold]))
        result[f"per_class_ap{tag}"] = {
            name: _json_float(per_threshold[threshold][c]) for name, c in zip(names, foreground)
        }
    result["ap50_void_free"] = _json_float(mean_ap(void_free))
    result["per_class_ap50_void_free"] = {name: _json_float(void_free[c]) for name, c in zip(names, foreground)}
    return result


# ---------------------------------------------------------------- panoptic segmentation


def _segment_index(ids: np.ndarray, segment_ids: Sequence[int], absent: int) -> np.ndarray:
    """Map an id map to 0..len(segment_ids)-1 by segment order; other ids -> `absent`."""
    values, inverse = np.unique(ids, return_inverse=True)
    position = {int(s): i for i, s in enumerate(segment_ids)}
    lookup = np.array([position.get(int(v), absent) for v in values], dtype=np.int64)
    return lookup[inverse.reshape(-1)]


def panoptic_quality(
    pred_pairs: Iterable[tuple],
    num_classes: int,
    thing_classes: Iterable[int],
    stuff_classes: Iterable[int],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Panoptic quality with the COCO panoptic evaluation's rules (docs/ALGORITHMS.md §3).

    pred_pairs: per image (pred_ids, pred_segments, gt_ids, gt_segments) or the same plus
    a void mask: pred_ids, gt_ids (H, W) int segment id maps (e.g. decoded from
    COCO's R + 256·G + 256²·B PNGs); pred_segments, gt_segments {segment id:
    category id}; void (H, W) bool or None. A GT pixel is VOID when its id is not a
    key of gt_segments (COCO's id 0) or void is True there (VOC's 255); a predicted
    pixel whose id is not a key of pred_segments belongs to no segment. Segments
    with no pixel are skipped. Crowd regions are not supported (VOC has none).
    num_classes: categories 0..num_classes-1 (background included); thing_classes and
    stuff_classes split them (wsseg: things 1..C, stuff {0}).

    Per image, a predicted and a GT segment of the same category match when IoU > 0.5
    (unique by construction), where predicted pixels on VOID are removed from the
    union. Matches are TPs (their IoUs summed), unmatched GT segments FNs, unmatched
    predicted segments FPs unless more than half of their pixels lie on VOID.
    Per category, SQ = ΣIoU/TP, RQ = TP/(TP + FP/2 + FN/2), PQ = SQ·RQ; "pq", "sq",
    "rq" are means over the categories with TP + FP + FN > 0, for all categories,
    "things" and "stuff" (each {"pq", "sq", "rq", "n"}; None when n = 0).
    per_class: {name: {"pq", "sq", "rq", "tp", "fp", "fn"}} for categories that occur.
    """
    things = {int(c) for c in thing_classes}
    stuff = {int(c) for c in stuff_classes}
    if things & stuff:
        raise ValueError(f"classes {sorted(things & stuff)} are both thing and stuff")
    if not (things | stuff) <= set(range(num_classes)):
        raise ValueError(f"thing/stuff classes must lie in 0..{num_classes - 1}")
    names = _names(class_names, num_classes)
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    fn = np.zeros(num_classes, dtype=np.int64)
    iou_sum = np.zeros(num_classes, dtype=np.float64)

    for index, pair in enumerate(pred_pairs):
        pred_ids, pred_segments, gt_ids, gt_segments = pair[:4]
        void = pair[4] if len(pair) > 4 else None
        pred_ids, gt_ids = np.asarray(pred_ids), np.asarray(gt_ids)
        if pred_ids.shape != gt_ids.shape or pred_ids.ndim != 2:
            raise ValueError(
                f"image {index}: pred {pred_ids.shape} and gt {gt_ids.shape} id maps differ"
            )
        for what, segments in (("prediction", pred_segments), ("ground truth", gt_segments)):
            bad = [c for c in segments.values() if int(c) not in things | stuff]
            if bad:
                raise ValueError(
                    f"image {index}: {what} category {bad[0]} is neither thing nor stuff"
                )
        pred_keys = list(pred_segments)
        gt_keys = list(gt_segments)
        num_pred, num_gt = len(pred_keys), len(gt_keys)
        # Rows: GT segments, then VOID (num_gt); columns: predicted segments, then none.
        rows = _segment_index(gt_ids, gt_keys, num_gt)
        if void is not None:
            void = np.asarray(void, dtype=bool)
            if void.shape != gt_ids.shape:
                raise ValueError(
                    f"image {index}: void mask {void.shape} differs from {gt_ids.shape}"
                )
            rows[void.reshape(-1)] = num_gt
        cols = _segment_index(pred_ids, pred_keys, num_pred)
        joint = np.bincount(
            rows * (num_pred + 1) + cols, minlength=(num_gt + 1) * (num_pred + 1)
        ).reshape(num_gt + 1, num_pred + 1)
        pred_area = joint.sum(axis=0)[:num_pred]
        gt_area = joint.sum(axis=1)[:num_gt]
        pred_on_void = joint[num_gt, :num_pred]
        pred_class = np.array([int(pred_segments[k]) for k in pred_keys], dtype=np.int64)
        gt_class = np.array([int(gt_segments[k]) for k in gt_keys], dtype=np.int64)

        pred_matched = np.zeros(num_pred, dtype=bool)
        gt_matched = np.zeros(num_gt, dtype=bool)
        for g, p in zip(*np.nonzero(joint[:num_gt, :num_pred])):
            if gt_class[g] != pred_class[p]:
                continue
            intersection = joint[g, p]
            union = pred_area[p] + gt_area[g] - intersection - pred_on_void[p]
            iou = intersection / union
            if iou > 0.5:  # IoU > 0.5 makes the match unique
                tp[gt_class[g]] += 1
                iou_sum[gt_class[g]] += iou
                pred_matched[p] = gt_matched[g] = True
        for g in np.flatnonzero(~gt_matched & (gt_area > 0)):
            fn[gt_class[g]] += 1
        for p in np.flatnonzero(~pred_matched & (pred_area > 0)):
            if pred_on_void[p] / pred_area[p] > 0.5:
                continue  # mostly on VOID: not a false positive
            fp[pred_class[p]] += 1

    occurs = (tp + fp + fn) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = tp + 0.5 * fp + 0.5 * fn
        pq = np.where(occurs, iou_sum / denominator, np.nan)
        sq = np.where(occurs, np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0), np.nan)
        rq = np.where(occurs, tp / denominator, np.nan)

    def averages(classes: set[int]) -> dict[str, Any]:
        chosen = [c for c in sorted(classes) if occurs[c]]
        return {
            "pq": _json_float(_nanmean(pq[chosen])),
            "sq": _json_float(_nanmean(sq[chosen])),
            "rq": _json_float(_nanmean(rq[chosen])),
            "n": len(chosen),
        }

    result = averages(things | stuff)
    result["per_class"] = {
        names[c]: {
            "pq": float(pq[c]),
            "sq": float(sq[c]),
            "rq": float(rq[c]),
            "tp": int(tp[c]),
            "fp": int(fp[c]),
            "fn": int(fn[c]),
        }
        for c in sorted(things | stuff)
        if occurs[c]
    }
    result["things"] = averages(things)
    result["stuff"] = averages(stuff)
    return result


def classification_average_precision(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Multi-label classification mAP: per-class AP over images (area under the interpolated PR curve).

    scores (N, C) float (higher = more confident); targets (N, C) 0/1. Classes with no
    positive image are left out of the mean (their AP is None).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0.5
    per_class: list[float | None] = []
    for k in range(scores.shape[1]):
        positives = int(targets[:, k].sum())
        if positives == 0:
            per_class.append(None)
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        per_class.append(_average_precision(targets[order, k], positives))
    valid = [v for v in per_class if v is not None]
    return {"map": float(np.mean(valid)) if valid else None, "per_class_ap": per_class}


def panoptic_headline(result: dict[str, Any]) -> dict[str, Any]:
    """What a stage's record keeps of panoptic_quality()'s result: PQ, SQ, RQ, PQ of things and of
    stuff, and PQ per category that occurs (the gallery's per-class bars)."""
    return {"pq": result["pq"], "sq": result["sq"], "rq": result["rq"], "pq_things": result["things"]["pq"],
            "pq_stuff": result["stuff"]["pq"],
            "per_class_pq": {name: values["pq"] for name, values in result["per_class"].items()}}
