from __future__ import annotations

import itertools

import pytest
import torch

from wsseg.ops.random_walk import random_walk, transition_matrix


@pytest.fixture(autouse=True)
def _one_thread():
    """The maps here are tiny: with a second thread, each of the 256 small sparse
    products waits on OpenMP synchronisation, which on a busy shared machine costs
    seconds per walk (docs/BENCHMARKS.md). One thread keeps the tests fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense_affinity(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """IRN's A^β built from scratch: every pair closer than the radius, both ways, plus 1 on the diagonal.

    Written without wsseg's path index: the path of a pair is every pixel of the box
    between them whose distance to the line through them is below 1.
    """
    height, width = boundary.shape
    pixels = list(itertools.product(range(height), range(width)))
    affinity = torch.eye(height * width, dtype=torch.float64)
    for (y0, x0), (y1, x1) in itertools.combinations(pixels, 2):
        dy, dx = y1 - y0, x1 - x0
        if dy * dy + dx * dx >= radius * radius:
            continue
        path_max = max(
            float(boundary[y, x])
            for y in range(min(y0, y1), max(y0, y1) + 1)
            for x in range(min(x0, x1), max(x0, x1) + 1)
            if (dy * (x - x0) - dx * (y - y0)) ** 2 < dy * dy + dx * dx
        )
        i, j = y0 * width + x0, y1 * width + x1
        affinity[i, j] = affinity[j, i] = 1.0 - path_max
    return affinity**beta


def _irn_dense_walk(seeds, boundary, radius, beta, squarings=8):
    """IRN's formulation: column-normalised dense A^β squared `squarings` times, x @ T."""
    num_channels, height, width = seeds.shape
    affinity = _dense_affinity(boundary, radius, beta)
    transition = affinity / affinity.sum(dim=0, keepdim=True)
    for _ in range(squarings):
        transition = transition @ transition
    x = (seeds.double() * (1 - boundary.double())).reshape(num_channels, -1)
    return (x @ transition).reshape(num_channels, height, width)


def _relative_max_difference(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("height, width, radius", [(9, 11, 5), (13, 7, 3), (9, 11, 3), (13, 7, 5)])
def test_walk_equals_irn_dense_formulation(height, width, radius):
    generator = torch.Generator().manual_seed(height * radius)
    boundary = torch.rand(height, width, generator=generator)
    seeds = torch.rand(3, height, width, generator=generator)
    expected = _irn_dense_walk(seeds, boundary, radius, beta=10.0)
    out = random_walk(seeds, boundary, radius=radius, beta=10.0, num_steps=256)
    assert out.shape == (3, height, width) and out.dtype == torch.float32
    # the walk runs in float64: what is left is the rounding of the float32 output
    assert _relative_max_difference(out, expected) <= 1e-5
    # the check can fail: too few steps is visibly different
    short = random_walk(seeds, boundary, radius=radius, beta=10.0, num_steps=128)
    assert _relative_max_difference(short, expected) > 1e-3


def test_transition_matrix_is_irn_row_normalised_affinity():
    generator = torch.Generator().manual_seed(3)
    boundary = torch.rand(6, 7, generator=generator, dtype=torch.float64)
    transition = transition_matrix(boundary, radius=4, beta=10.0)
    assert transition.layout == torch.sparse_csr and transition.shape == (42, 42)
    affinity = _dense_affinity(boundary, radius=4, beta=10.0)
    expected = affinity / affinity.sum(dim=1, keepdim=True)
    torch.testing.assert_close(transition.to_dense(), expected, rtol=1e-12, atol=1e-15)
    # only the pairs inside the map are stored: the pixel itself and its disc neighbours
    assert transition.values().numel() == int((_dense_affinity(torch.zeros(6, 7), 4, 1.0) > 0).sum())
    columns = transition.col_indices()
    for start, stop in zip(transition.crow_indices()[:-1], transition.crow_indices()[1:]):
        assert torch.all(columns[start + 1 : stop] > columns[start : stop - 1])  # sorted, no duplicates


def test_transition_matrix_detailed_balance():
    """P = D⁻¹A with A symmetric and A_ii = 1: deg_i P_ij = deg_j P_ji with deg_i = 1 / P_ii."""
    generator = torch.Generator().manual_seed(4)
    transition = transition_matrix(torch.rand(8, 9, generator=generator, dtype=torch.float64)).to_dense()
    degree = 1.0 / transition.diagonal()
    flow = degree[:, None] * transition
    torch.testing.assert_close(flow, flow.t(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(transition.sum(dim=1), torch.ones(72, dtype=torch.float64))


def test_uniform_seeds_without_boundary_stay_uniform():
    seeds = torch.full((2, 10, 12), 0.7)
    out = random_walk(seeds, torch.zeros(10, 12), num_steps=64)
    torch.testing.assert_close(out, seeds, rtol=1e-6, atol=0)


def test_degree_weighted_mass_is_conserved_and_values_stay_in_range():
    generator = torch.Generator().manual_seed(5)
    boundary = torch.rand(10, 12, generator=generator) ** 3
    seeds = torch.rand(2, 10, 12, generator=generator)
    out = random_walk(seeds, boundary, num_steps=40)
    start = seeds * (1 - boundary)
    # the stationary measure of P = D⁻¹A is the degree: Σ deg·x does not change
    degree = 1.0 / transition_matrix(boundary).to_dense().diagonal().reshape(10, 12)
    torch.testing.assert_close((out * degree).sum(dim=(1, 2)), (start * degree).sum(dim=(1, 2)), rtol=1e-5, atol=0)
    # averaging: no value above the largest seed or below the smallest
    assert torch.all(out <= start.amax(dim=(1, 2), keepdim=True) + 1e-6)
    assert torch.all(out >= start.amin(dim=(1, 2), keepdim=True) - 1e-6)


def test_a_well_connected_map_settles_at_the_degree_weighted_mean():
    generator = torch.Generator().manual_seed(7)
    boundary = 0.2 * torch.rand(10, 12, generator=generator)  # weak boundary: every pixel is well linked
    seeds = torch.rand(2, 10, 12, generator=generator)
    degree = 1.0 / transition_matrix(boundary).to_dense().diagonal().reshape(10, 12)
    start = seeds * (1 - boundary)
    mean = (start * degree).sum(dim=(1, 2)) / degree.sum()
    settled = random_walk(seeds, boundary, num_steps=1024)
    torch.testing.assert_close(settled, mean[:, None, None].expand_as(settled), rtol=1e-4, atol=0)
    assert not torch.allclose(random_walk(seeds, boundary, num_steps=4), settled, rtol=1e-2)


def test_a_closed_boundary_keeps_the_walk_inside():
    boundary = torch.zeros(14, 14)
    boundary[3:11, 3:11] = 1.0
    boundary[4:10, 4:10] = 0.0  # a one-pixel ring of boundary around a 6x6 room
    seeds = torch.zeros(1, 14, 14)
    seeds[0, 6, 6] = 1.0
    out = random_walk(seeds, boundary, num_steps=256)
    inside = torch.zeros(14, 14, dtype=torch.bool)
    inside[4:10, 4:10] = True
    assert torch.all(out[0][~inside] == 0)
    assert torch.all(out[0][inside] > 0)


def test_channels_walk_independently_and_linearly():
    generator = torch.Generator().manual_seed(6)
    boundary = torch.rand(9, 10, generator=generator)
    seeds = torch.rand(3, 9, 10, generator=generator)
    together = random_walk(seeds, boundary, num_steps=32)
    for k in range(3):
        torch.testing.assert_close(random_walk(seeds[k : k + 1], boundary, num_steps=32)[0], together[k])
    combined = random_walk((2 * seeds[0] + 3 * seeds[1])[None], boundary, num_steps=32)[0]
    torch.testing.assert_close(combined, 2 * together[0] + 3 * together[1])
    # zero steps: the seeds damped by the boundary
    torch.testing.assert_close(random_walk(seeds, boundary, num_steps=0), seeds * (1 - boundary))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same size"):
        random_walk(torch.rand(2, 5, 6), torch.rand(5, 7))


def test_no_seeds_give_an_empty_result():
    """An image with no instance seeds walks nothing and does not crash (docs/ALGORITHMS.md §1.6)."""
    out = random_walk(torch.zeros(0, 6, 8), torch.rand(6, 8))
    assert out.shape == (0, 6, 8) and out.dtype == torch.float32
