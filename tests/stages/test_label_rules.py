"""How walked CAMs become labels: IRN's global normalisation and the walked-background rule."""

import numpy as np
import pytest
import torch

from wsseg.config import load_config
from wsseg.ops.instances import instances_from_walk
from wsseg.stages.synthesize_labels import (background_level, background_margin, semantic_labels, walk_scores,
                                            walk_to_full_size)

SIZE = (64, 64)  # full resolution; the stride-4 maps are 16 x 16


def config(walk_background: bool):
    return load_config([], [f"labels.walk_background={str(walk_background).lower()}", "labels.walk_steps=64"])


def square_with_boundary() -> tuple[torch.Tensor, torch.Tensor]:
    """A strong CAM (1.0) on a 6 x 6 square fenced by a boundary ring, a weak CAM (0.1) elsewhere."""
    cam = torch.full((1, 16, 16), 0.1)
    cam[0, 5:11, 5:11] = 1.0
    boundary = torch.zeros(16, 16)
    boundary[4:12, 4:12] = 1.0
    boundary[5:11, 5:11] = 0.0
    return cam, boundary


def test_irn_rule_divides_the_walk_by_its_max():
    cam, boundary = square_with_boundary()
    scores, unit = walk_scores(cam, boundary, SIZE, config(False))
    walked = walk_to_full_size(cam, boundary, SIZE, config(False))
    assert unit == 1.0 and torch.allclose(scores, walked / walked.max())


def test_walked_background_is_a_local_average_of_the_cam():
    """No boundary, a constant CAM c: every pixel's walked CAM over its walked unit is exactly c."""
    cam = torch.full((2, 16, 16), 0.3)
    cam[1] = 0.05
    scores, unit = walk_scores(cam, torch.zeros(16, 16), SIZE, config(True))
    assert torch.allclose(scores / unit, torch.tensor([0.3, 0.05])[:, None, None].expand(2, *SIZE), atol=1e-5)


@pytest.mark.parametrize("walk_background", [False, True])
def test_a_fenced_strong_object_is_found_by_both_rules(walk_background):
    cam, boundary = square_with_boundary()
    scores, unit = walk_scores(cam, boundary, SIZE, config(walk_background))
    labels = semantic_labels(scores, np.array([2]), 0.25 * unit)
    assert (labels[24:40, 24:40] == 3).all() and (labels[:12] == 0).all() and (labels[-12:] == 0).all()


def test_a_weak_diffuse_cam_stays_background_only_with_the_walked_background():
    """A CAM of ~0.2 everywhere (nothing confident): IRN's division by the max turns the whole
    image into the class; compared in CAM units, it stays below the 0.25 background."""
    cam = torch.full((1, 16, 16), 0.2)
    cam[0, 7:9, 7:9] = 0.22
    labels = {}
    for walk_background in (False, True):
        scores, unit = walk_scores(cam, torch.zeros(16, 16), SIZE, config(walk_background))
        labels[walk_background] = semantic_labels(scores, np.array([0]), 0.25 * unit)
    assert (labels[False] == 1).all() and (labels[True] == 0).all()


@pytest.mark.parametrize("walk_background", [False, True])
def test_min_background_gives_the_lowest_scoring_share_to_background_only_when_short(walk_background):
    """A CAM strong everywhere (nothing below the level 0.2): with a minimum background share of
    0.3 the 30 % of pixels with the lowest walked score become background, and only those; an
    image that already has enough background keeps its level."""
    ramp = torch.linspace(0.5, 1.0, 16)
    cam = (ramp[None, :, None] * torch.ones(16)).expand(1, 16, 16).clone()  # rises from top to bottom
    scores, unit = walk_scores(cam, torch.zeros(16, 16), SIZE, config(walk_background))
    assert (semantic_labels(scores, np.array([0]), 0.2 * unit) == 1).all()
    level = background_level(scores, unit, 0.2, 0.3)
    labels = semantic_labels(scores, np.array([0]), level * unit)
    share = (labels == 0).mean()
    assert 0.3 <= share < 0.35, share
    best = (scores.max(dim=0).values / unit).numpy()
    assert best[labels == 0].max() <= best[labels == 1].min()  # the lowest-scoring pixels, not any 30 %
    assert (labels[:8] == 0).all() and (labels[-8:] == 1).all()
    assert background_level(scores, unit, 0.2, 0.0) == 0.2  # off

    cam, boundary = square_with_boundary()  # ~86 % background already
    scores, unit = walk_scores(cam, boundary, SIZE, config(walk_background))
    assert background_level(scores, unit, 0.2, 0.3) == 0.2


@pytest.mark.parametrize("walk_background", [False, True])
def test_background_margin_is_the_distance_of_the_deciding_score_to_the_level(walk_background):
    """labels/margin: |best class score − background level| in the walk's units, clipped to 1."""
    cam, boundary = square_with_boundary()
    scores, unit = walk_scores(cam * 0.6, boundary, SIZE, config(walk_background))
    level = 0.25
    labels = semantic_labels(scores, np.array([0]), level * unit)
    margin = background_margin(scores, unit, level)
    best = (scores.max(dim=0).values / unit).numpy()
    np.testing.assert_allclose(margin, np.clip(np.abs(best - level), 0, 1), atol=1e-6)
    # where two neighbours' labels differ their scores straddle the level: each margin is at most the step
    assert (labels == 1).any() and (labels == 0).any()
    differs = labels[:-1] != labels[1:]
    step = np.abs(best[:-1] - best[1:])
    assert differs.any()
    assert (margin[:-1][differs] <= step[differs] + 1e-6).all() and (margin[1:][differs] <= step[differs] + 1e-6).all()
    assert (background_margin(scores[:0], unit, level) == 1).all()  # no class: background everywhere, certain


def test_instances_take_a_background_plane():
    walked = np.zeros((1, 20, 20), np.float32)
    walked[0, :, :10] = 0.5
    plane = np.full((20, 20), 0.25, np.float32)
    plane[:, :5] = 0.9  # background wins on the left quarter
    ids, classes, scores = instances_from_walk(walked, np.array([1]), background=plane, normalise=False)
    assert (ids[:, :5] == 0).all() and (ids[:, 5:10] == 1).all() and (ids[:, 10:] == 0).all()
    assert classes.tolist() == [2] and scores.tolist() == [0.5]  # not normalised: the walked value itself
