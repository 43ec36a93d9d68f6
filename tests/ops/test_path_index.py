from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg.ops.path_index import (
    BG_POS,
    FG_POS,
    UNSURE,
    NEG,
    directions,
    pair_labels,
    path_affinity,
    path_points,
    source_crop,
)


def _disc(radius: int) -> set[tuple[int, int]]:
    span = range(-radius, radius + 1)
    return {(y, x) for y in span for x in span if 0 < y * y + x * x < radius**2}


@pytest.mark.parametrize("radius, count", [(10, 152), (5, 34), (3, 12)])
def test_directions_are_a_half_disc_with_each_pair_once(radius, count):
    dirs = directions(radius)
    assert dirs.shape == (count, 2) and dirs.dtype == np.int64
    forward = {tuple(d) for d in dirs.tolist()}
    backward = {(-y, -x) for y, x in forward}
    assert len(forward) == count  # no duplicates
    assert not forward & backward  # never both d and -d
    assert forward | backward == _disc(radius)  # together: every neighbour in the disc


def test_directions_order():
    dirs = directions(5).tolist()
    assert dirs[:4] == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert dirs[4] == [1, -4] and dirs[-1] == [4, 2]


@pytest.mark.parametrize(
    "direction, expected",
    [
        ((0, 3), [(0, 0), (0, 1), (0, 2), (0, 3)]),
        ((2, 0), [(0, 0), (1, 0), (2, 0)]),
        ((1, 2), [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]),
        ((2, 2), [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]),
        ((3, -1), [(0, 0), (0, -1), (1, 0), (1, -1), (2, 0), (2, -1), (3, 0), (3, -1)]),
    ],
)
def test_path_points_known_values(direction, expected):
    points = path_points(direction)
    assert points.dtype == np.int64
    assert [tuple(p) for p in points.tolist()] == expected


def test_paths_run_from_source_to_target_in_8_connected_steps():
    for direction in directions(10):
        points = path_points(direction)
        assert tuple(points[0]) == (0, 0) and tuple(points[-1]) == tuple(direction)
        steps = np.abs(np.diff(points, axis=0)).max(axis=1)
        assert (steps == 1).all(), direction  # 8-connected, no repeated point
        dy, dx = direction
        distance_sq = (dy * points[:, 1] - dx * points[:, 0]) ** 2 / (dy * dy + dx * dx)
        assert (distance_sq < 1).all()
        assert (points.min(0) >= np.minimum(0, direction)).all()
        assert (points.max(0) <= np.maximum(0, direction)).all()


def test_source_crop_is_the_largest_crop_that_keeps_every_direction_inside():
    height, width, radius = 12, 15, 4
    rows, cols = source_crop(height, width, radius)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 9, 3, 12)
    dirs = directions(radius)
    ys = np.arange(rows.start, rows.stop)
    xs = np.arange(cols.start, cols.stop)
    for dy, dx in dirs:
        assert 0 <= ys.min() + dy and ys.max() + dy < height
        assert 0 <= xs.min() + dx and xs.max() + dx < width
    # tight: one more row below or column either side would leave the map
    assert rows.start == 0 and rows.stop - 1 + dirs[:, 0].max() == height - 1
    assert cols.start + dirs[:, 1].min() == 0 and cols.stop - 1 + dirs[:, 1].max() == width - 1
    with pytest.raises(ValueError):
        source_crop(3, 15, 4)


def _brute_affinity(boundary: np.ndarray, radius: int):
    """Affinity and the (b, y, x) arg-max point of every pair, by explicit loops."""
    batch, height, width = boundary.shape
    rows, cols = source_crop(height, width, radius)
    dirs = directions(radius)
    out = np.zeros((batch, len(dirs), rows.stop - rows.start, cols.stop - cols.start))
    argmax = {}
    for b in range(batch):
        for k, (dy, dx) in enumerate(dirs):
            for i, y in enumerate(range(rows.start, rows.stop)):
                for j, x in enumerate(range(cols.start, cols.stop)):
                    path = [(y + py, x + px) for py, px in path_points((dy, dx))]
                    values = [boundary[b, py, px] for py, px in path]
                    out[b, k, i, j] = 1 - max(values)
                    argmax[b, k, i, j] = path[int(np.argmax(values))]
    return out, argmax


@pytest.mark.parametrize("radius", [3, 4])
def test_path_affinity_matches_loops(radius):
    generator = torch.Generator().manual_seed(radius)
    boundary = torch.rand(2, 7, 9, generator=generator, dtype=torch.float64)
    expected, _ = _brute_affinity(boundary.numpy(), radius)
    out = path_affinity(boundary, radius)
    assert out.shape == expected.shape and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_path_affinity_gradient_goes_to_the_max_on_each_path():
    radius = 3
    generator = torch.Generator().manual_seed(0)
    boundary = torch.rand(2, 6, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    out = path_affinity(boundary, radius)
    weights = torch.rand(out.shape, generator=generator, dtype=torch.float64)
    (out * weights).sum().backward()

    _, argmax = _brute_affinity(boundary.detach().numpy(), radius)
    expected = np.zeros(boundary.shape)
    for (b, k, i, j), (y, x) in argmax.items():
        expected[b, y, x] -= weights[b, k, i, j].item()  # d(1 - max)/d(max point) = -1
    np.testing.assert_allclose(boundary.grad.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: path_affinity(t, radius), (boundary.detach().requires_grad_(),))


def test_path_affinity_is_one_without_boundary_and_zero_across_a_wall():
    boundary = torch.zeros(1, 6, 9)
    assert torch.equal(path_affinity(boundary, 3), torch.ones(1, 12, 4, 5))
    boundary[0, :, 4] = 1.0  # a vertical wall: every pair with dx != 0 crossing column 4 is cut
    out = path_affinity(boundary, 3)
    rows, cols = source_crop(6, 9, 3)
    for k, (dy, dx) in enumerate(directions(3)):
        for j, x in enumerate(range(cols.start, cols.stop)):
            crosses = min(x, x + dx) <= 4 <= max(x, x + dx)
            assert torch.all(out[0, k, :, j] == (0.0 if crosses else 1.0))


def test_pair_labels_match_loops():
    radius = 3
    generator = torch.Generator().manual_seed(1)
    choices = torch.tensor([0, 1, 2, 255])
    labels = choices[torch.randint(0, 4, (2, 6, 8), generator=generator)]
    codes = pair_labels(labels, radius)
    rows, cols = source_crop(6, 8, radius)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 12, rows.stop, cols.stop - cols.start)
    assert len({BG_POS, FG_POS, NEG, UNSURE}) == 4
    for b in range(2):
        for k, (dy, dx) in enumerate(directions(radius)):
            for i, y in enumerate(range(rows.start, rows.stop)):
                for j, x in enumerate(range(cols.start, cols.stop)):
                    a, c = int(labels[b, y, x]), int(labels[b, y + dy, x + dx])
                    if a == 255 or c == 255:
                        expected = UNSURE
                    elif a == c == 0:
                        expected = BG_POS
                    elif a == c:
                        expected = FG_POS
                    else:
                        expected = NEG
                    assert codes[b, k, i, j] == expected
    assert {int(v) for v in codes.unique()} == {BG_POS, FG_POS, NEG, UNSURE}


def test_stride4_labels_are_what_irns_nearest_resize_picks():
    """IRN shrinks the relation map with PIL's nearest resize (pil_rescale(label, 0.25, 0)): the
    centre pixel (4y+2, 4x+2) of each cell, not its corner."""
    from PIL import Image

    from wsseg.ops.path_index import labels_at_stride4

    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (128, 96), (512, 500)):
        labels = rng.integers(0, 6, size=(height, width)).astype(np.uint8)
        small = (int(np.round(height * 0.25)), int(np.round(width * 0.25)))
        expected = np.asarray(Image.fromarray(labels).resize(small[::-1], Image.NEAREST))
        ours = labels_at_stride4(torch.from_numpy(labels)[None].long(), small)[0].numpy()
        assert np.array_equal(ours, expected), (height, width)
        assert not np.array_equal(labels[::4, ::4][: small[0], : small[1]], expected)  # the corner is not it
    # a map whose grid reaches past its last row takes the last row, never an out-of-range index
    labels = torch.arange(10 * 9).reshape(1, 10, 9)
    assert labels_at_stride4(labels, (3, 3))[0, -1, -1] == labels[0, 9, 8]
