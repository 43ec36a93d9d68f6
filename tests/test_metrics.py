from __future__ import annotations

import json

import numpy as np
import pytest

from wsseg.metrics import (
    ConfusionMatrix,
    best_background_threshold,
    instance_average_precision,
    panoptic_quality,
)

# ---------------------------------------------------------------- confusion matrix

TARGET = np.array([[0, 0, 1], [1, 2, 255]])
PREDICTION = np.array([[0, 1, 1], [1, 2, 0]])
# Labelled (target, prediction) pairs: (0,0) (0,1) (1,1) (1,1) (2,2); (255, 0) ignored.
# class 0: TP 1, GT 2, pred 1 -> 1 / (2 + 1 - 1) = 1/2
# class 1: TP 2, GT 2, pred 3 -> 2 / (2 + 3 - 2) = 2/3
# class 2: TP 1, GT 1, pred 1 -> 1
# mIoU = (1/2 + 2/3 + 1) / 3 = 13/18; pixel accuracy 4/5; class accuracy (1/2 + 1 + 1) / 3 = 5/6


def test_confusion_matrix_miou_with_ignore():
    cm = ConfusionMatrix(3)
    cm.update(PREDICTION, TARGET)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    np.testing.assert_allclose(cm.iou(), [1 / 2, 2 / 3, 1])
    s = cm.summary(["bg", "a", "b"])
    assert s["miou"] == pytest.approx(13 / 18)
    assert s["pixel_accuracy"] == pytest.approx(4 / 5)
    assert s["mean_class_accuracy"] == pytest.approx(5 / 6)
    assert s["per_class_iou"] == pytest.approx({"bg": 1 / 2, "a": 2 / 3, "b": 1.0})


def test_confusion_matrix_nanmean_over_absent_classes():
    cm = ConfusionMatrix(5)
    # Class 3 is in neither map; class 4 only in the prediction (IoU 0, counted).
    cm.update(PREDICTION, TARGET)
    cm.update(np.array([[4]]), np.array([[255]]))  # ignored target: no effect
    iou = cm.iou()
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    s = cm.summary()
    assert s["miou"] == pytest.approx(13 / 18)
    assert s["per_class_iou"]["3"] is None
    json.dumps(s)  # NaN-free, JSON-friendly

    cm.update(np.array([[4, 1]]), np.array([[1, 1]]))
    # class 1: TP 3, GT 4, pred 4 -> 3/5; class 4: TP 0, GT 0, pred 1 -> 0
    # mIoU = (1/2 + 3/5 + 1 + 0) / 4 = 21/40 (class 3 still left out)
    assert cm.summary()["miou"] == pytest.approx(21 / 40)


def test_confusion_matrix_out_of_range_prediction_is_wrong():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1, 255, -1]]), np.array([[1, 1, 1]]))
    # class 1: TP 1, GT 3, pred 1 -> 1/3; class 0 absent; accuracy 1/3
    s = cm.summary()
    assert s["per_class_iou"] == {"0": None, "1": pytest.approx(1 / 3)}
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["pixel_accuracy"] == pytest.approx(1 / 3)


def test_confusion_matrix_errors_and_merge():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class 7"):
        cm.update(np.zeros((1, 2)), np.array([[0, 7]]))
    whole = ConfusionMatrix(3)
    whole.update(PREDICTION, TARGET)
    first, second = ConfusionMatrix(3), ConfusionMatrix(3)
    first.update(PREDICTION[:1], TARGET[:1])
    second.update(PREDICTION[1:], TARGET[1:])
    np.testing.assert_array_equal(first.merge(second).matrix, whole.matrix)
    with pytest.raises(ValueError):
        first.merge(ConfusionMatrix(4))


def test_empty_confusion_matrix_summary():
    s = ConfusionMatrix(2).summary()
    assert s["miou"] is None and s["pixel_accuracy"] is None


# ---------------------------------------------------------------- background sweep


def test_best_background_threshold_one_pass():
    images = [
        # keys [2] -> class 3; cam 0.1 0.3 0.5 0.7 against target 0 0 3 3
        (np.array([[[0.1, 0.3, 0.5, 0.7]]]), np.array([2]), np.array([[0, 0, 3, 3]])),
        # no foreground class: all background; the 255 pixel is ignored
        (np.zeros((0, 1, 2)), np.zeros(0, dtype=np.int64), np.array([[0, 255]])),
    ]
    sweep = best_background_threshold(iter(images), [0.2, 0.4, 0.5], num_classes=4)
    # t=0.2: pred 0 3 3 3 | 0 -> class 0: TP 2, GT 3, pred 2 -> 2/3
    #                          class 3: TP 2, GT 2, pred 3 -> 2/3
    # t=0.4: pred 0 0 3 3 | 0 -> perfect -> 1
    # t=0.5: tie 0.5 == t goes to background: pred 0 0 0 3 | 0
    #   class 0: TP 3, GT 3, pred 4 -> 3/4; class 3: TP 1, GT 2, pred 1 -> 1/2 -> 5/8
    assert sweep["miou"] == pytest.approx([2 / 3, 1.0, 5 / 8])
    assert sweep["best_threshold"] == 0.4 and sweep["best_miou"] == pytest.approx(1.0)
    # Same matrices as labelling each image by argmax over [t plane; cam].
    for t, matrix in zip([0.2, 0.4, 0.5], sweep["matrices"]):
        reference = ConfusionMatrix(4)
        for cam, keys, target in images:
            planes = np.concatenate([np.full((1,) + target.shape, t), cam])
            reference.update(np.concatenate([[0], keys + 1])[planes.argmax(0)], target)
        np.testing.assert_array_equal(matrix.matrix, reference.matrix)


# ---------------------------------------------------------------- instance AP


def row_masks(*pixel_sets: list[int], width: int = 6) -> np.ndarray:
    """(N, 1, width) bool masks, each the listed pixels of a 1-row image."""
    masks = np.zeros((len(pixel_sets), 1, width), dtype=bool)
    for mask, pixels in zip(masks, pixel_sets):
        mask[0, pixels] = True
    return masks


# Two GT instances of class 1 in one 1x6 image: A = pixels 0,1; B = pixels 2,3.
GT_AB = (np.array([[1, 1, 2, 2, 0, 0]]), np.array([1, 1]))


def test_ap_known_pr_curve_tp_fp_tp():
    pred = (row_masks([0, 1], [4, 5], [2, 3]), np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7]))
    # sorted: TP (A), FP (IoU 0), TP (B)
    # precision 1, 1/2, 2/3; recall 1/2, 1/2, 1
    # interpolated: at recall 1/2 -> max(1, 1/2, 2/3) = 1; at recall 1 -> 2/3
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    result = instance_average_precision([pred], [GT_AB], num_classes=2)
    assert result["ap50"] == pytest.approx(5 / 6)
    assert result["per_class_ap50"] == {"1": pytest.approx(5 / 6)}


def test_ap_score_ordering_matters():
    pred = (row_masks([0, 1], [4, 5], [2, 3]), np.array([1, 1, 1]), np.array([0.9, 0.95, 0.7]))
    # sorted: FP, TP (A), TP (B): precision 0, 1/2, 2/3; recall 0, 1/2, 1
    # interpolated at recall 1/2 -> max(1/2, 2/3) = 2/3; at 1 -> 2/3; AP = 2/3
    result = instance_average_precision([pred], [GT_AB], num_classes=2)
    assert result["ap50"] == pytest.approx(2 / 3)


def test_ap_duplicate_is_false_positive():
    pred = (row_masks([0, 1], [0, 1], [2, 3]), np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7]))
    # the second detection of A finds A taken and B at IoU 0: FP -> TP, FP, TP -> 5/6
    result = instance_average_precision([pred], [GT_AB], num_classes=2)
    assert result["ap50"] == pytest.approx(5 / 6)


def test_ap_takes_the_best_iou_ground_truth_even_when_it_is_taken():
    # Overlapping GT stack: A = 0..3 (4 px), B = 0..5 (6 px). Both detections are 0..3: the
    # first takes A (IoU 1); the second's best GT is A again (IoU 1 > 4/6), already taken: a
    # false positive, as in chainercv, although B (IoU 4/6) is still free.
    gt = (row_masks([0, 1, 2, 3], [0, 1, 2, 3, 4, 5]), np.array([1, 1]))
    pred = (row_masks([0, 1, 2, 3], [0, 1, 2, 3]), np.array([1, 1]), np.array([0.9, 0.8]))
    result = instance_average_precision([pred], [gt], num_classes=2, iou_thresholds=(0.5, 0.75))
    # TP, FP: precision 1, 1/2; recall 1/2, 1/2 -> AP 1/2 at both thresholds
    assert result["ap50"] == pytest.approx(0.5)
    assert result["ap75"] == pytest.approx(0.5)
    assert result["per_class_ap75"] == {"1": pytest.approx(0.5)}


def test_coco_ap_perfect_prediction_is_one():
    rng = np.random.default_rng(0)
    predictions, ground_truths = [], []
    for _ in range(3):
        ids = rng.integers(0, 4, (5, 7))  # instances 1..3, 0 = none
        classes = rng.integers(1, 4, 3)
        predictions.append((ids, classes, rng.random(3)))
        ground_truths.append((ids, classes, ids == 0))
    result = instance_average_precision(predictions, ground_truths, num_classes=4)
    assert result["ap"] == pytest.approx(1.0)
    assert result["ap50"] == pytest.approx(1.0)


def test_ap_void_leaves_the_ground_truth_but_counts_in_the_prediction():
    gt_ids = np.array([[1, 1, 0, 0]])
    pred = (np.array([[1, 1, 1, 1]]), np.array([1]), np.array([0.5]))
    void = np.array([[False, False, True, True]])
    # the field's rule: pixels 2, 3 are void, the prediction still covers them: IoU 2/4 = 0.5,
    # a TP only at IoU 0.50 of the ten thresholds -> ap = 1/10
    scored = instance_average_precision([pred], [(gt_ids, np.array([1]), void)], num_classes=2)
    assert scored["ap50"] == pytest.approx(1.0) and scored["ap"] == pytest.approx(0.1)
    # the void-free column removes them from the prediction too: IoU 2/2
    assert scored["ap50_void_free"] == pytest.approx(1.0)
    # a GT mask drawn over the outline is cut back to the non-void pixels: 0..1 of 0..3
    over = instance_average_precision([(np.array([[1, 1, 0, 0]]), np.array([1]), np.array([0.5]))],
                                      [(np.array([[1, 1, 1, 1]]), np.array([1]), void)], num_classes=2)
    assert over["ap"] == pytest.approx(1.0)
    # where the outline decides: prediction 0..2 of a GT 0..1 with pixel 2 void, IoU 2/3 counted,
    # 1 void-free; at IoU 0.75 only the void-free rule would call it a hit
    tight = (np.array([[1, 1, 1, 0]]), np.array([1]), np.array([0.5]))
    at75 = instance_average_precision([tight], [(gt_ids, np.array([1]), np.array([[False, False, True, False]]))],
                                      num_classes=2, iou_thresholds=(0.75,))
    assert at75["ap75"] == 0.0 and at75["ap50"] == pytest.approx(1.0)


def _chainercv_ap50(predictions, ground_truths, num_classes):
    """A slow, literal re-statement of chainercv's eval_instance_segmentation_voc at IoU 0.5:
    per image and class, detections by descending score, each takes argmax-IoU GT; then the
    PR curve over all images."""
    scores, matches, num_gt = {}, {}, {}
    for (p_ids, p_cls, p_sc), (g_ids, g_cls, void) in zip(predictions, ground_truths):
        for c in range(1, num_classes):
            pm = [p_ids == k + 1 for k in range(len(p_cls)) if p_cls[k] == c]
            ps = [p_sc[k] for k in range(len(p_cls)) if p_cls[k] == c]
            gm = [(g_ids == k + 1) & ~void for k in range(len(g_cls)) if g_cls[k] == c]
            num_gt[c] = num_gt.get(c, 0) + len(gm)
            order = sorted(range(len(ps)), key=lambda i: -ps[i])
            selected = [False] * len(gm)
            for i in order:
                scores.setdefault(c, []).append(ps[i])
                ious = [(pm[i] & g).sum() / max((pm[i] | g).sum(), 1) for g in gm]
                if ious and max(ious) >= 0.5:
                    j = int(np.argmax(ious))
                    matches.setdefault(c, []).append(0 if selected[j] else 1)
                    selected[j] = True
                else:
                    matches.setdefault(c, []).append(0)
    aps = []
    for c in range(1, num_classes):
        if num_gt.get(c, 0) == 0:
            continue
        order = np.argsort(-np.array(scores.get(c, [])), kind="stable")
        match = np.array(matches.get(c, []), dtype=int)[order]
        tp, fp = np.cumsum(match == 1), np.cumsum(match == 0)
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / num_gt[c]
        mpre = np.concatenate([[0], precision, [0]])
        mrec = np.concatenate([[0], recall, [1]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    return float(np.mean(aps))


def _random_instance_set(seed, images=12, size=(24, 32), num_classes=4):
    """Disjoint GT instances with a void band around each (as VOC draws them), and noisy
    predictions: shifted, grown, shrunk, missed, duplicated and invented ones, with scores."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    predictions, ground_truths = [], []
    for _ in range(images):
        gt_ids = np.zeros(size, np.int64)
        classes = []
        for k in range(rng.integers(1, 5)):
            top, left = rng.integers(0, size[0] - 6), rng.integers(0, size[1] - 6)
            h, w = rng.integers(4, 12), rng.integers(4, 14)
            gt_ids[top : top + h, left : left + w] = len(classes) + 1
            classes.append(int(rng.integers(1, num_classes)))
        present = [k for k in range(1, len(classes) + 1) if (gt_ids == k).any()]
        remap = np.zeros(len(classes) + 1, np.int64)
        remap[present] = np.arange(1, len(present) + 1)
        gt_ids, classes = remap[gt_ids], np.array([classes[k - 1] for k in present])
        void = np.zeros(size, bool)  # a 1-px outline on each object's edge, as VOC draws it
        for k in range(1, len(classes) + 1):
            mask = gt_ids == k
            void |= mask & ~ndimage.binary_erosion(mask)
        pred_ids = np.zeros(size, np.int64)
        pred_classes, pred_scores = [], []
        for k in range(1, len(classes) + 1):
            if rng.random() < 0.15:
                continue  # missed
            mask = np.roll(gt_ids == k, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
            if rng.random() < 0.3:
                mask = ndimage.binary_dilation(mask)
            pred_ids[mask & (pred_ids == 0)] = len(pred_classes) + 1
            pred_classes.append(classes[k - 1] if rng.random() > 0.1 else int(rng.integers(1, num_classes)))
            pred_scores.append(float(rng.random()))
        for _ in range(rng.integers(0, 3)):  # invented
            top, left = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 4)
            pred_ids[top : top + 4, left : left + 5][pred_ids[top : top + 4, left : left + 5] == 0] = len(pred_classes) + 1
            pred_classes.append(int(rng.integers(1, num_classes)))
            pred_scores.append(float(rng.random()))
        kept = [k for k in range(1, len(pred_classes) + 1) if (pred_ids == k).any()]
        remap = np.zeros(len(pred_classes) + 1, np.int64)
        remap[kept] = np.arange(1, len(kept) + 1)
        predictions.append((remap[pred_ids], np.array([pred_classes[k - 1] for k in kept], np.int64),
                            np.array([pred_scores[k - 1] for k in kept])))
        ground_truths.append((gt_ids, classes, void))
    return predictions, ground_truths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_equals_a_literal_chainercv_restatement(seed):
    predictions, ground_truths = _random_instance_set(seed)
    ours = instance_average_precision(predictions, ground_truths, num_classes=4)["ap50"]
    assert ours == pytest.approx(_chainercv_ap50(predictions, ground_truths, 4), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_agrees_with_pycocotools(seed):
    """COCOeval at IoU 0.5 scores predictions as they are against ground truth without the void
    pixels, like chainercv; it differs by its 101-point interpolation (and by matching the best
    unmatched instance, which disjoint ground truth makes rare)."""
    coco = pytest.importorskip("pycocotools.coco")
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    predictions, ground_truths = _random_instance_set(seed)
    height, width = ground_truths[0][0].shape
    images, annotations, detections = [], [], []
    for index, ((p_ids, p_cls, p_sc), (g_ids, g_cls, void)) in enumerate(zip(predictions, ground_truths)):
        images.append({"id": index, "height": height, "width": width})
        for k, c in enumerate(g_cls):
            rle = mask_utils.encode(np.asfortranarray(((g_ids == k + 1) & ~void).astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(c), "iscrowd": 0,
                                "segmentation": rle, "area": float(mask_utils.area(rle)),
                                "bbox": list(mask_utils.toBbox(rle))})
        for k, c in enumerate(p_cls):
            rle = mask_utils.encode(np.asfortranarray((p_ids == k + 1).astype(np.uint8)))
            detections.append({"image_id": index, "category_id": int(c), "segmentation": rle, "score": float(p_sc[k])})
    truth = coco.COCO()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    truth.createIndex()
    evaluation = COCOeval(truth, truth.loadRes(detections), "segm")
    evaluation.params.maxDets = [1, 10, 1000]
    evaluation.evaluate()
    evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all recalls, classes, all areas, 1000 dets
    coco_ap50 = float(np.mean([precision[:, k][precision[:, k] > -1].mean() for k in range(precision.shape[1])
                               if (precision[:, k] > -1).any()]))
    ours = instance_average_precision(predictions, ground_truths, num_classes=4)
    assert abs(ours["ap50"] - coco_ap50) < 0.01, (ours["ap50"], coco_ap50)
    assert ours["ap50_void_free"] > ours["ap50"]  # the outlines cost the predictions something here


def test_ap_empty_images_and_classes_without_gt():
    empty_pred = (np.zeros((0, 1, 4), dtype=bool), np.zeros(0), np.zeros(0))
    empty_gt = (np.zeros((1, 4), dtype=np.int64), np.zeros(0))
    gt_one = (np.array([[1, 1, 0, 0]]), np.array([1]))
    # no prediction at all: AP 0 for class 1; class 2 has no GT -> None, not in the mean
    result = instance_average_precision([empty_pred], [gt_one], num_classes=3)
    assert result["ap50"] == 0.0
    assert result["per_class_ap50"] == {"1": 0.0, "2": None}
    # a detection on an image without GT is an FP: FP (0.9) then TP (0.8)
    # precision 0, 1/2; recall 0, 1 -> AP = 1 * 1/2
    fp = (np.array([[1, 0, 0, 0]]), np.array([1]), np.array([0.9]))
    tp = (np.array([[1, 1, 0, 0]]), np.array([1]), np.array([0.8]))
    spurious = (np.array([[0, 0, 1, 1]]), np.array([2]), np.array([0.7]))
    result = instance_average_precision(
        [fp, tp, spurious], [empty_gt, gt_one, empty_gt], num_classes=3
    )
    assert result["per_class_ap50"] == {"1": pytest.approx(0.5), "2": None}
    assert result["ap50"] == pytest.approx(0.5)
    # nothing anywhere: undefined, not a crash
    nothing = instance_average_precision([empty_pred], [empty_gt], num_classes=3)
    assert nothing["ap50"] is None and nothing["ap"] is None
    json.dumps(nothing)


def test_ap_rejects_bad_classes():
    pred = (np.array([[1, 0]]), np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError, match="1..2"):
        instance_average_precision([pred], [(np.array([[0, 0]]), np.zeros(0))], num_classes=3)


# ---------------------------------------------------------------- panoptic quality

ROW = np.array  # the id maps below are single image rows: ROW([[...]])


def test_pq_match_needs_iou_above_half():
    # gt: thing (cat 1) on pixels 0,1; stuff (cat 0) on 2,3. pred: one thing segment on all 4.
    gt_ids, gt_segments = ROW([[1, 1, 2, 2]]), {1: 1, 2: 0}
    pred_ids, pred_segments = ROW([[5, 5, 5, 5]]), {5: 1}
    # thing IoU = 2 / (4 + 2 - 2) = 0.5, not > 0.5: FP + FN for cat 1; stuff: FN for cat 0
    result = panoptic_quality([(pred_ids, pred_segments, gt_ids, gt_segments)], 2, [1], [0])
    assert result["per_class"]["1"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    assert result["per_class"]["0"]["fn"] == 1
    assert result["pq"] == 0.0 and result["n"] == 2


def test_pq_void_removed_from_union():
    # gt pixels 2,3 have id 0, not a segment: VOID. union = 4 + 2 - 2 - 2 (pred on void) = 2
    # IoU = 2/2 = 1 -> TP; PQ = SQ = RQ = 1
    pred = (ROW([[5, 5, 5, 5]]), {5: 1})
    by_id = panoptic_quality([pred + (ROW([[1, 1, 0, 0]]), {1: 1})], 2, [1], [0])
    # the same VOID given as a mask over a stuff segment (VOC's 255): that segment vanishes
    mask = np.array([[False, False, True, True]])
    by_mask = panoptic_quality([pred + (ROW([[1, 1, 2, 2]]), {1: 1, 2: 0}, mask)], 2, [1], [0])
    for result in (by_id, by_mask):
        assert (result["pq"], result["sq"], result["rq"], result["n"]) == (1.0, 1.0, 1.0, 1)
        assert result["stuff"]["n"] == 0 and result["stuff"]["pq"] is None


def test_pq_unmatched_prediction_mostly_on_void_is_not_fp():
    gt_ids, gt_segments = ROW([[1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]), {1: 0}  # stuff 6 px, VOID 4
    pred_ids = ROW([[9, 9, 9, 9, 8, 6, 6, 7, 7, 7]])
    pred_segments = {9: 0, 8: 1, 6: 1, 7: 1}
    # 9 (cat 0): inter 4, union 4 + 6 - 4 - 0 = 6 -> IoU 2/3, TP
    # 8 (cat 1): 0 of 1 px on VOID -> FP
    # 6 (cat 1): 1 of 2 px on VOID = 50%, not > 50% -> FP
    # 7 (cat 1): 3 of 3 px on VOID -> ignored
    # cat 0: PQ = SQ = 2/3, RQ 1; cat 1: TP 0, FP 2 -> 0, 0, 0
    # all: PQ 1/3, SQ 1/3, RQ 1/2
    result = panoptic_quality([(pred_ids, pred_segments, gt_ids, gt_segments)], 2, [1], [0])
    assert result["per_class"]["1"]["fp"] == 2
    assert result["per_class"]["0"]["pq"] == pytest.approx(2 / 3)
    assert (result["pq"], result["sq"], result["rq"]) == pytest.approx((1 / 3, 1 / 3, 1 / 2))
    assert result["things"]["pq"] == 0.0 and result["stuff"]["pq"] == pytest.approx(2 / 3)


def test_pq_things_stuff_split_over_images():
    first = (
        ROW([[5, 5, 5, 6, 6, 0]]), {5: 0, 6: 1},  # pixel 5 predicts no segment
        ROW([[1, 1, 1, 2, 2, 2]]), {1: 0, 2: 1},
    )
    # cat 0: IoU 3/3 = 1, TP; cat 1: inter 2, union 2 + 3 - 2 = 3 -> 2/3, TP
    second = (
        ROW([[5, 5, 5, 5, 7, 7]]), {5: 0, 7: 1},
        ROW([[1, 1, 2, 2, 3, 3]]), {1: 0, 2: 1, 3: 2},
    )
    # cat 0: inter 2, union 4 + 2 - 2 = 4 -> 0.5, no match: FP + FN
    # gt 2 (cat 1) unmatched: FN; gt 3 (cat 2) vs pred 7 (cat 1): wrong category
    #   -> FN cat 2, FP cat 1
    # cat 0: TP 1 (IoU 1), FP 1, FN 1 -> denominator 2: PQ 1/2, SQ 1, RQ 1/2
    # cat 1: TP 1 (IoU 2/3), FP 1, FN 1 -> PQ 1/3, SQ 2/3, RQ 1/2
    # cat 2: FN 1 -> 0, 0, 0; cat 3 never occurs and is left out
    # things {1, 2}: PQ 1/6, SQ 1/3, RQ 1/4; stuff {0}: 1/2, 1, 1/2
    # all: PQ (1/2 + 1/3) / 3 = 5/18, SQ (1 + 2/3) / 3 = 5/9, RQ 1/3
    names = ["background", "cat", "dog", "cow"]
    result = panoptic_quality([first, second], 4, [1, 2, 3], [0], class_names=names)
    assert set(result["per_class"]) == {"background", "cat", "dog"}
    assert result["per_class"]["cat"] == {
        "pq": pytest.approx(1 / 3), "sq": pytest.approx(2 / 3), "rq": 0.5, "tp": 1, "fp": 1, "fn": 1
    }
    assert (result["pq"], result["sq"], result["rq"]) == pytest.approx((5 / 18, 5 / 9, 1 / 3))
    assert result["things"] == {
        "pq": pytest.approx(1 / 6), "sq": pytest.approx(1 / 3), "rq": 0.25, "n": 2
    }
    assert result["stuff"] == {"pq": 0.5, "sq": 1.0, "rq": 0.5, "n": 1}
    json.dumps(result)


def test_pq_rejects_unknown_category():
    pair = (ROW([[5]]), {5: 9}, ROW([[1]]), {1: 0})
    with pytest.raises(ValueError, match="category 9"):
        panoptic_quality([pair], 2, [1], [0])
    with pytest.raises(ValueError, match="both"):
        panoptic_quality([], 2, [0, 1], [0])


@pytest.mark.parametrize("seed", range(4))
def test_ap_of_id_maps_equals_ap_of_their_mask_stacks(seed):
    """The id-map path (one joint histogram, O(H·W) memory) gives exactly the stacks' numbers, void
    pixels and absent ids included."""
    from wsseg.metrics import _mask_stack

    rng = np.random.default_rng(seed)
    predictions, truths, stacked_predictions, stacked_truths = [], [], [], []
    for _ in range(3):
        m, g = int(rng.integers(0, 6)), int(rng.integers(0, 5))
        pred = rng.integers(0, m + 2, (24, 30)).astype(np.int64)  # id m + 1 is not an instance
        gt = rng.integers(0, g + 1, (24, 30)).astype(np.int64)
        void = rng.random((24, 30)) < 0.1
        pred_classes, gt_classes = rng.integers(1, 4, m), rng.integers(1, 4, g)
        scores = rng.random(m)
        predictions.append((pred, pred_classes, scores))
        truths.append((gt, gt_classes, void))
        stacked_predictions.append((_mask_stack(pred, m, "p"), pred_classes, scores))
        stacked_truths.append((_mask_stack(gt, g, "g"), gt_classes, void))
    fast = instance_average_precision(predictions, truths, 4, iou_thresholds=(0.5, 0.75))
    slow = instance_average_precision(stacked_predictions, stacked_truths, 4, iou_thresholds=(0.5, 0.75))
    assert fast == slow
