"""What the gallery's run section finds in a record and how it orders and smooths what it draws."""

import pytest

from wsseg import plots
from wsseg.run_view import mode_bars, per_class_tables, sweep_of


def test_per_class_tables_group_by_measure_with_the_stage_s_own_series_first():
    metrics = {
        "miou": 0.4,
        "best_per_class_iou": {"background": 0.9, "a": 0.5},
        "per_class_iou": {"background": 0.3, "a": 0.1},
        "instance_per_class_ap50": {"a": 0.2, "b": None},
        "per_class_pq": {"a": 0.3},
        "context_decoupling_objects": {"a": 3},  # a mapping, but not per class of a measure
        "pseudo": {"per_class_iou": {"a": 0.6}, "miou_single": 0.5},
        "gt": {"per_class_iou": {"a": 0.8}},
    }
    tables = per_class_tables(metrics)
    assert set(tables) == {"iou", "ap50", "pq"}
    assert list(tables["iou"]) == ["as evaluated", "at the best level", "pseudo", "gt"]
    assert tables["iou"]["pseudo"] == {"a": 0.6} and tables["iou"]["gt"] == {"a": 0.8}
    assert tables["ap50"] == {"instance": {"a": 0.2, "b": None}}
    assert tables["pq"] == {"as evaluated": {"a": 0.3}}


def test_sweep_and_its_marked_levels():
    metrics = {"sweep": {"0.10": 0.2, "0.46": 0.4, "0.70": 0.5}, "threshold": 0.1, "otsu_threshold": 0.4609,
               "best_threshold": 0.7, "best_at_sweep_edge": True}
    points, marks = sweep_of(metrics)
    assert points == {0.1: 0.2, 0.46: 0.4, 0.7: 0.5}
    assert marks == {"fixed (eval_threshold)": 0.1, "relative (Otsu level)": 0.4609, "best": 0.7}
    assert sweep_of({"miou": 0.3}) is None


def test_mode_bars_per_label_source():
    metrics = {"model": "x", "pseudo": {"miou_single": 0.5, "miou_msflip": 0.55, "miou_crf": 0.6, "steps": 9},
               "gt": {"miou_single": 0.7}, "miou": 0.6}
    assert mode_bars(metrics) == {"pseudo": {"single": 0.5, "msflip": 0.55, "crf": 0.6}, "gt": {"single": 0.7}}


def test_worst_class_first_and_missing_values_last():
    series = {"a": {"x": 0.5, "y": 0.1, "z": None, "w": 0.3}, "b": {"x": 0.0, "v": 0.2}}
    assert plots.class_order(series) == ["y", "w", "x", "z", "v"]


def test_smoothing_is_tensorboard_s_debiased_moving_average():
    values = [1.0, 3.0, None, 2.0]
    weight = 1 - 1 / 4
    expected, average, count = [], 0.0, 0
    for value in values:  # the slow reference, written out
        if value is None:
            expected.append(expected[-1])
            continue
        average = weight * average + (1 - weight) * value
        count += 1
        expected.append(average / (1 - weight ** count))
    assert plots.smooth(values, 4) == pytest.approx(expected)
    assert plots.smooth([2.0] * 5, 4) == pytest.approx([2.0] * 5)  # a constant stays itself from the first step
    assert plots.smooth(values, 1) == values
