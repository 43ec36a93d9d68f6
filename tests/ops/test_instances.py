from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg.ops.instances import (
    centroid_groups,
    follow_displacement,
    instance_seeds,
    instances_from_walk,
)


def field_toward(centres: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """(2, h, w) field pointing from every pixel to its nearest centre (IRN's convention)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    centres_arr = np.asarray(centres, dtype=np.float64)
    dist = (rows[None] - centres_arr[:, 0, None, None]) ** 2 + (
        cols[None] - centres_arr[:, 1, None, None]
    ) ** 2
    nearest = np.argmin(dist, axis=0)
    dy = centres_arr[nearest, 0] - rows
    dx = centres_arr[nearest, 1] - cols
    return np.stack([dy, dx]).astype(np.float32)


def slow_follow(field: np.ndarray, row: int, col: int, num_steps: int) -> tuple[int, int]:
    """One pixel at a time, with an explicit bilinear interpolation."""
    height, width = field.shape[1:]
    y, x = float(row), float(col)
    for _ in range(num_steps):
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        fy, fx = y - y0, x - x0
        value = (
            (1 - fy) * (1 - fx) * field[:, y0, x0]
            + (1 - fy) * fx * field[:, y0, x1]
            + fy * (1 - fx) * field[:, y1, x0]
            + fy * fx * field[:, y1, x1]
        )
        y = min(max(y + value[0], 0.0), height - 1.0)
        x = min(max(x + value[1], 0.0), width - 1.0)
    return int(np.rint(y)), int(np.rint(x))


def test_follow_displacement_reaches_the_centre_and_matches_a_slow_reference():
    # Half steps toward (5, 9): every pixel converges geometrically onto the centre.
    field = 0.5 * field_toward([(5.0, 9.0)], 12, 16)
    end = follow_displacement(field, num_steps=30)
    assert end.shape == (12, 16, 2) and end.dtype == np.int64
    assert np.all(end[..., 0] == 5) and np.all(end[..., 1] == 9)

    rng = np.random.default_rng(0)
    noisy = rng.normal(0, 1.5, size=(2, 9, 11)).astype(np.float32)
    end = follow_displacement(noisy, num_steps=7)
    for row, col in [(0, 0), (4, 5), (8, 10), (3, 0), (0, 7)]:
        assert tuple(end[row, col]) == slow_follow(noisy.astype(np.float64), row, col, 7)


def test_follow_displacement_stays_inside_the_map():
    rng = np.random.default_rng(1)
    field = rng.normal(0, 20, size=(2, 7, 13)).astype(np.float32)  # huge, random steps
    field[0, :, :] += 50  # and a strong push off the bottom edge
    end = follow_displacement(torch.from_numpy(field), num_steps=20)
    assert end[..., 0].min() >= 0 and end[..., 0].max() <= 6
    assert end[..., 1].min() >= 0 and end[..., 1].max() <= 12
    assert np.any(end[..., 0] == 6)


def test_two_centres_give_two_groups():
    height, width = 20, 30
    # Full steps: the field is zero only at the centres, |D| < 2.5 in a small disc.
    field = field_toward([(10.0, 7.0), (9.0, 22.0)], height, width)
    groups = centroid_groups(field)
    assert groups.shape == (height, width) and groups.dtype == np.int64
    assert set(np.unique(groups)) == {0, 1}
    cols = np.arange(width)
    # Left half belongs to the left centre's group, right half to the right one.
    left = groups[:, cols < 13]
    right = groups[:, cols > 16]
    assert np.all(left == groups[10, 7]) and np.all(right == groups[9, 22])
    assert groups[10, 7] != groups[9, 22]


def test_paths_ending_outside_every_region_are_one_more_group_listed_last():
    # Pixels in columns 0..9 point to a centre (5, 3); columns 10..19 push right to the
    # border, where |D| stays large: they end outside every centroid region.
    field = np.zeros((2, 11, 20), dtype=np.float32)
    field[:, :, :10] = field_toward([(5.0, 3.0)], 11, 20)[:, :, :10]
    field[1, :, 10:] = 5.0
    groups = centroid_groups(field, num_steps=50)
    assert np.all(groups[:, :10] == 0)
    assert np.all(groups[:, 10:] == 1)


def test_instance_seeds_bookkeeping():
    cams = np.zeros((2, 4, 6), dtype=np.float32)
    cams[0, :, :3] = 1.0  # class 4 lives in the left half only
    cams[1] = 0.5  # class 11 everywhere
    keys = np.array([4, 11])
    groups = np.zeros((4, 6), dtype=np.int64)
    groups[:, 3:] = 1
    seeds, seed_classes, seed_groups = instance_seeds(cams, keys, groups)
    # (class 4, group 1) is empty and left out.
    assert seed_classes.tolist() == [4, 11, 11]
    assert seed_groups.tolist() == [0, 0, 1]
    assert seeds.shape == (3, 4, 6) and seeds.dtype == np.float32
    for seed, key, group in zip(seeds, seed_classes, seed_groups):
        channel = keys.tolist().index(key)
        np.testing.assert_array_equal(seed, cams[channel] * (groups == group))

    none, classes, group_ids = instance_seeds(np.zeros((1, 4, 6)), np.array([2]), groups)
    assert none.shape == (0, 4, 6) and classes.shape == (0,) and group_ids.shape == (0,)


def test_instances_from_walk_known_instances_and_scores():
    height, width = 20, 20
    walked = np.zeros((2, height, width), dtype=np.float32)
    # Seed 0 (class 0 -> 1): two separate blobs, peaks 2.0 and 1.0 before normalisation.
    walked[0, 2:6, 2:8] = 2.0
    walked[0, 12:18, 12:18] = 1.0
    # Seed 1 (class 6 -> 7): one blob, peak 0.8, beaten by seed 0 where they overlap.
    walked[1, 2:6, 10:16] = 0.8
    walked[1, 2:6, 6:8] = 0.3
    ids, classes, scores = instances_from_walk(walked, np.array([0, 6]), background=0.25)
    assert ids.shape == (height, width) and ids.dtype == np.uint16
    assert classes.tolist() == [1, 1, 7]
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.4], rtol=1e-6)
    expected = np.zeros((height, width), dtype=np.uint16)
    expected[2:6, 2:8] = 1
    expected[12:18, 12:18] = 2
    expected[2:6, 10:16] = 3
    np.testing.assert_array_equal(ids, expected)


def test_background_threshold_after_global_normalisation():
    walked = np.zeros((1, 10, 10), dtype=np.float32)
    walked[0, :5] = 4.0
    walked[0, 5:] = 0.9  # 0.225 after dividing by 4: loses to background 0.25
    ids, classes, scores = instances_from_walk(walked, np.array([2]))
    assert np.all(ids[:5] == 1) and np.all(ids[5:] == 0)
    ids, _, _ = instances_from_walk(walked, np.array([2]), background=0.2)
    assert np.all(ids == 1)


def test_small_components_are_kept_with_score_zero():
    height, width = 30, 30  # 900 px: 1 % = 9 px
    walked = np.zeros((1, height, width), dtype=np.float32)
    walked[0, 0:2, 0:4] = 1.0  # 8 px < 9: score 0 although it holds the global max
    walked[0, 10:13, 10:13] = 0.6  # 9 px: not under 1 %, keeps its score
    ids, classes, scores = instances_from_walk(walked, np.array([0]))
    assert classes.tolist() == [1, 1]
    np.testing.assert_allclose(scores, [0.0, 0.6], rtol=1e-6)
    assert (ids == 1).sum() == 8 and (ids == 2).sum() == 9


def test_components_are_four_connected():
    walked = np.zeros((1, 4, 4), dtype=np.float32)
    walked[0, 0, 0] = walked[0, 1, 1] = 1.0  # diagonal neighbours: two instances
    ids, classes, _ = instances_from_walk(walked, np.array([0]), min_area_fraction=0.0)
    assert len(classes) == 2 and ids[0, 0] != ids[1, 1]


@pytest.mark.parametrize(
    "walked",
    [
        np.zeros((0, 8, 9), dtype=np.float32),  # no seeds at all
        np.zeros((2, 8, 9), dtype=np.float32),  # seeds that walked to nothing
        np.full((1, 8, 9), 0.0, dtype=np.float32) + np.eye(8, 9, dtype=np.float32) * -1,
    ],
)
def test_no_instance_is_an_empty_result_not_a_crash(walked):
    ids, classes, scores = instances_from_walk(walked, np.zeros(len(walked), dtype=np.int64))
    assert ids.shape == (8, 9) and ids.dtype == np.uint16 and not ids.any()
    assert classes.shape == (0,) and classes.dtype == np.int64
    assert scores.shape == (0,) and scores.dtype == np.float32


def test_the_composed_chain_on_a_synthetic_image():
    """groups -> seeds -> (identity walk) -> upsample -> instances: two objects, one class."""
    h, w = 10, 20
    field = field_toward([(5.0, 4.0), (5.0, 15.0)], h, w)
    groups = centroid_groups(field)
    cam = np.zeros((1, h, w), dtype=np.float32)
    cam[0, 3:8, 2:7] = 1.0
    cam[0, 3:8, 13:18] = 0.9
    seeds, seed_classes, _ = instance_seeds(cam, np.array([14]), groups)
    walked = np.repeat(np.repeat(seeds, 4, axis=1), 4, axis=2)  # stand-in for walk + x4
    ids, classes, scores = instances_from_walk(walked, seed_classes)
    assert classes.tolist() == [15, 15]
    np.testing.assert_allclose(sorted(scores), [0.9, 1.0], rtol=1e-6)
    assert ids[5 * 4, 4 * 4] != ids[5 * 4, 15 * 4]
