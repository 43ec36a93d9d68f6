"""Random walk on the boundary-aware affinity graph (IRN, docs/ALGORITHMS.md §1.6).

Each pixel of the stride-4 map is linked to its neighbours within ``radius`` (the
directions of path_index, both ways) with affinity a = 1 - max boundary on the path
between them, and to itself with affinity 1. The transition matrix is
P = D⁻¹ A^β (A to the power β elementwise, rows normalised), and the walk applies
P ``num_steps`` times to the seeds X = cam · (1 - B).

IRN forms the dense N x N matrix (N ≈ 11,750 for a VOC image: ~0.55 GB per float32
matrix) and squares it log2(num_steps) = 8 times (~26 TFLOP per image). Applying the
sparse P (at most 69 entries a row for radius 5) 256 times gives the same result in
~0.8 GFLOP for two seed channels and O(N) memory. Among the formulations measured on
CPU (docs/BENCHMARKS.md, "Random walk": torch CSR, scipy CSR, a stencil over the
2D + 1 shifted maps), torch's CSR @ dense was the fastest and scales best with the
number of seed channels; it runs unchanged on CUDA.

Threads: each of the 256 products is small (~1 ms), so with more intra-op threads
than idle cores the OpenMP hand-offs dominate: on a busy 2-core machine the walk of a
VOC map took 1.7 s with 2 threads and 0.5 s with 1. Run parallel per-image walks
with one torch thread per worker (or OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from wsseg.ops.path_index import directions, path_affinity

RADIUS = 5  # IRN: radius 5 at inference (34 directions)
BETA = 10.0  # IRN: beta 10
NUM_STEPS = 256  # IRN: 2^8 (the dense matrix squared 8 times)


def _stencil(boundary: Tensor, radius: int, beta: float) -> tuple[list[tuple[int, int]], Tensor]:
    """Transition weights of every pixel towards each offset of the full disc.

    Returns the offsets (S = 2D + 1 of them, (dy, dx) in lexicographic order, so the
    flat column index dy * W + dx grows with the offset) and weights (S, H, W):
    weights[s, y, x] = P[(y, x), (y + dy, x + dx)], 0 where the neighbour is outside
    the map. Weights sum to 1 over s.
    """
    height, width = boundary.shape
    reach = radius - 1
    # Pad with boundary 1 so every pixel is a source; a neighbour outside the map
    # then has affinity 0 and is absent (IRN pads the same way).
    padded = F.pad(boundary[None], (reach, reach, 0, reach), value=1.0)
    # clamp: a boundary value above 1 must not turn into a positive even power
    forward = path_affinity(padded, radius)[0].clamp(min=0.0) ** beta  # (D, H, W)

    # The pair (i, i + d) also links i + d back to i with the same weight: at pixel
    # p the weight towards p - d is the forward weight of p - d.
    forward_padded = F.pad(forward, (reach, reach, reach, reach))
    dirs = directions(radius).tolist()
    backward = torch.stack(
        [
            forward_padded[k, reach - dy : reach - dy + height, reach - dx : reach - dx + width]
            for k, (dy, dx) in enumerate(dirs)
        ]
    )
    offsets = [(-dy, -dx) for dy, dx in dirs] + [(0, 0)] + [(dy, dx) for dy, dx in dirs]
    weights = torch.cat([backward, torch.ones_like(forward[:1]), forward])
    order = sorted(range(len(offsets)), key=lambda s: offsets[s])
    offsets = [offsets[s] for s in order]
    weights = weights[order]
    return offsets, weights / weights.sum(dim=0, keepdim=True)


def transition_matrix(boundary: Tensor, radius: int = RADIUS, beta: float = BETA) -> Tensor:
    """Row-stochastic transition matrix P = D⁻¹ A^β of the walk, as a sparse CSR tensor.

    boundary: (H, W) float in [0, 1], class-boundary probability at stride 4.
    Returns (N, N) sparse CSR with N = H * W (pixels in raster order), in the dtype
    and on the device of ``boundary``. Row i holds pixel i itself and its neighbours
    within ``radius`` that lie inside the map (at most 2D + 1 entries), columns in
    increasing order.
    """
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (H, W), got shape {tuple(boundary.shape)}")
    height, width = boundary.shape
    offsets, weights = _stencil(boundary, radius, beta)
    device = boundary.device

    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    pixel = (ys * width + xs).reshape(-1)
    columns, inside = [], []
    for dy, dx in offsets:
        inside.append((((ys + dy) >= 0) & ((ys + dy) < height) & ((xs + dx) >= 0) & ((xs + dx) < width)).reshape(-1))
        columns.append(pixel + (dy * width + dx))
    # (N, S) tables in row-major order: the kept entries are already in CSR order
    inside_table = torch.stack(inside, dim=1)
    values = weights.reshape(len(offsets), -1).t()[inside_table]
    col_indices = torch.stack(columns, dim=1)[inside_table]
    crow_indices = F.pad(inside_table.sum(dim=1).cumsum(dim=0), (1, 0))
    size = (height * width, height * width)
    with warnings.catch_warnings():
        # torch labels its CSR layout "beta"; construction and CSR @ dense are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # torch 2.11 on CUDA warns that the checks are off even when check_invariants=False says so
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, size, check_invariants=False)


def random_walk(
    seeds: Tensor,
    boundary: Tensor,
    *,
    radius: int = RADIUS,
    beta: float = BETA,
    num_steps: int = NUM_STEPS,
) -> Tensor:
    """Propagate seed maps along the affinity graph (IRN's semantic/instance refinement).

    seeds: (K, H, W) float, e.g. CAM channels at stride 4 (K classes, or
    class-and-instance seeds; all walk with the same P). boundary: (H, W) float in
    [0, 1] at stride 4. Returns (K, H, W) float32, P^num_steps applied to
    seeds · (1 - boundary), on the device of the inputs.

    The walk runs in float64: on CPU it costs about the time of float32 (the sparse
    product is bound by index traffic: the same for two channels, ~+30 % for 20) and
    keeps the 256 steps exact to ~1e-13, where float32 weights and steps drift by
    ~1e-4 relative on a VOC-sized map.
    """
    if seeds.dim() != 3 or boundary.dim() != 2 or seeds.shape[1:] != boundary.shape:
        raise ValueError(
            f"seeds must be (K, H, W) and boundary (H, W) of the same size, "
            f"got {tuple(seeds.shape)} and {tuple(boundary.shape)}"
        )
    num_channels, height, width = seeds.shape
    boundary = boundary.to(torch.float64)
    transition = transition_matrix(boundary, radius, beta)
    state = (seeds.to(torch.float64) * (1.0 - boundary)).reshape(num_channels, height * width).t().contiguous()
    for _ in range(num_steps):
        state = transition @ state  # (N, N) sparse @ (N, K): all channels in one product
    return state.t().reshape(num_channels, height, width).to(torch.float32)
