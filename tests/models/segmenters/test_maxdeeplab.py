"""MaX-DeepLab: Hungarian matching against brute force, the PQ-style loss by hand (value
and stop-gradients), a perfect prediction, slot-permutation invariance, non-overlapping
masks and valid panoptic maps, the ∅ prior, targets, training and the segmenter contract."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmenter_batches import assert_param_groups_partition
from wsseg.models.segmenters.maxdeeplab import (
    MaXDeepLab,
    hungarian_match,
    panoptic_from_slots,
    panoptic_target,
    prepare_target,
    semantic_target,
)

NUM_CLASSES = 3  # background + 2 thing classes


def tiny(seed: int = 0, **kwargs) -> MaXDeepLab:
    torch.manual_seed(seed)
    return MaXDeepLab.tiny(NUM_CLASSES, **kwargs)


def two_instance_targets(size: int = 64) -> list[dict]:
    """Two images, each with two thing instances, background stuff and a void band."""
    u = size // 16  # coordinates on a 16x16 grid
    targets = []
    for shift in (0, 2):
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        masks[0, 2 * u:7 * u, 2 * u:7 * u] = True
        masks[1, 9 * u:15 * u, (4 + shift) * u:12 * u] = True
        masks[2] = ~(masks[0] | masks[1])
        void = torch.zeros(size, size, dtype=torch.bool)
        void[:, :u] = True
        targets.append({"masks": masks, "classes": torch.tensor([1, 2, 0]), "void": void})
    return targets


def random_outputs(seed: int, batch: int = 2, slots: int = 6, size: int = 16, dims: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"mask_logits": torch.randn(batch, slots, size, size, generator=generator) * 3,
            "class_logits": torch.randn(batch, slots, NUM_CLASSES + 1, generator=generator) * 2,
            "pixel_features": F.normalize(torch.randn(batch, dims, size, size, generator=generator), dim=1),
            "semantic": torch.randn(batch, NUM_CLASSES, size, size, generator=generator)}


def check_panoptic(ids: np.ndarray, info: list[dict], size: tuple[int, int]) -> None:
    """A valid panoptic map: every non-zero id listed once with its exact area."""
    assert ids.shape == size and ids.dtype == np.int64
    listed = [segment["id"] for segment in info]
    assert len(listed) == len(set(listed)) and 0 not in listed
    assert set(np.unique(ids)) - {0} == set(listed)
    for segment in info:
        assert segment["area"] == int((ids == segment["id"]).sum()) > 0
        assert segment["isthing"] == int(segment["category_id"] != 0)


# -- matching -------------------------------------------------------------------------

def brute_force_best(similarity: np.ndarray) -> float:
    rows, cols = similarity.shape
    best = -math.inf
    for chosen in itertools.permutations(range(cols), min(rows, cols)):
        if rows <= cols:
            best = max(best, sum(similarity[i, j] for i, j in enumerate(chosen)))
        else:
            for gts in itertools.permutations(range(rows), cols):
                best = max(best, sum(similarity[i, j] for i, j in zip(gts, chosen)))
    return best


@pytest.mark.parametrize("shape", [(3, 5), (4, 4), (4, 2)])
def test_hungarian_matches_brute_force_and_ignores_slot_order(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    similarity = torch.rand(*shape, generator=generator)
    gt, slots = hungarian_match(similarity)
    assert len(gt) == min(shape) and len(set(slots.tolist())) == len(slots)
    total = similarity[gt, slots].sum().item()
    assert total == pytest.approx(brute_force_best(similarity.numpy()), abs=1e-6)
    # Permuting the slots permutes the assignment and keeps the optimum.
    permutation = torch.randperm(shape[1], generator=generator)
    gt2, slots2 = hungarian_match(similarity[:, permutation])
    assert similarity[:, permutation][gt2, slots2].sum().item() == pytest.approx(total, abs=1e-6)
    assert torch.equal(gt2, gt) and torch.equal(permutation[slots2], slots)


# -- loss -----------------------------------------------------------------------------

def test_pq_loss_value_and_stop_gradients_by_hand():
    """One 2x3 image, 3 slots: the PQ-style term and its class-logit gradient from the formula."""
    model = tiny()
    masks = torch.zeros(2, 2, 3, dtype=torch.bool)
    masks[0, :, :2] = True          # thing, class 2: 4 pixels
    masks[1, 0, 2] = True           # background stuff: 1 pixel; pixel (1, 2) is void
    target = {"masks": masks, "classes": torch.tensor([2, 0])}
    generator = torch.Generator().manual_seed(3)
    mask_logits = torch.randn(1, 3, 2, 3, generator=generator).requires_grad_(True)
    class_logits = torch.randn(1, 3, NUM_CLASSES + 1, generator=generator).requires_grad_(True)
    outputs = {"mask_logits": mask_logits, "class_logits": class_logits,
               "pixel_features": F.normalize(torch.randn(1, 4, 2, 3, generator=generator), dim=1)}
    terms = model.loss(outputs, [target])
    assert set(terms) == {"pq", "mask_id", "instance", "total"}  # no "semantic" output given

    m = torch.softmax(mask_logits[0].detach(), 0).reshape(3, 6).numpy().astype(np.float64)
    m[:, 5] = 0.0                                                   # void pixel
    g = np.array([[1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=np.float64)
    p = torch.softmax(class_logits[0].detach(), -1).numpy().astype(np.float64)
    dice = 2 * (g @ m.T) / (g.sum(1)[:, None] + m.sum(1)[None, :] + 2e-5)
    classes = [2, 0]
    best = max(itertools.permutations(range(3), 2),
               key=lambda s: sum(p[s[i], classes[i]] * dice[i, s[i]] for i in range(2)))
    alpha, slots = 0.75, 3
    positive = sum(p[best[i], classes[i]] * (1 - dice[i, best[i]]) - dice[i, best[i]] * math.log(p[best[i], classes[i]])
                   for i in range(2))
    unmatched = ({0, 1, 2} - set(best)).pop()
    negative = -math.log(p[unmatched, -1])
    assert terms["pq"].item() == pytest.approx((alpha * positive + (1 - alpha) * negative) / slots, rel=1e-5)

    # Gradient w.r.t. the class logits: matched slot j of segment i gets α/N·Dice·(p̂_j − e_c)
    # (the p̂ weight of the Dice term is stop-gradient), an unmatched slot (1−α)/N·(p̂_j − e_∅).
    terms["pq"].backward()
    expected = np.zeros((3, NUM_CLASSES + 1))
    for i in range(2):
        j = best[i]
        expected[j] = alpha / slots * dice[i, j] * (p[j] - np.eye(NUM_CLASSES + 1)[classes[i]])
    expected[unmatched] = (1 - alpha) / slots * (p[unmatched] - np.eye(NUM_CLASSES + 1)[-1])
    np.testing.assert_allclose(class_logits.grad[0].numpy(), expected, rtol=1e-4, atol=1e-7)
    # Gradient w.r.t. the mask logits: only −α/N·sg(p̂)·Dice moves the masks (the Dice
    # weight of the −log p̂ term is stop-gradient). Reference: autograd of that sum alone.
    logits = mask_logits.detach().clone().requires_grad_(True)
    soft = torch.softmax(logits[0].double(), 0).reshape(3, 6) * torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64)
    gt = torch.from_numpy(g)
    dice_t = 2 * (gt @ soft.T) / (gt.sum(1)[:, None] + soft.sum(1)[None, :] + 2e-5)
    reference = -sum(alpha / slots * p[best[i], classes[i]] * dice_t[i, best[i]] for i in range(2))
    reference.backward()
    torch.testing.assert_close(mask_logits.grad, logits.grad.float(), rtol=1e-4, atol=1e-7)


def perfect_outputs(targets: list[dict], slots: int, assignment: list[list[int]], dims: int = 8) -> dict:
    """Outputs whose slot assignment[b][i] is exactly segment i with class probability ~1."""
    batch = len(targets)
    size = targets[0]["masks"].shape[-2:]
    mask_logits = torch.zeros(batch, slots, *size)
    class_logits = torch.zeros(batch, slots, NUM_CLASSES + 1)
    class_logits[..., -1] = 30.0  # every slot ∅ ...
    for b, target in enumerate(targets):
        for i, slot in enumerate(assignment[b]):
            mask_logits[b, slot][target["masks"][i]] = 30.0
            class_logits[b, slot] = 0.0
            class_logits[b, slot, target["classes"][i]] = 30.0  # ... but the matched ones
    features = torch.zeros(batch, dims, *size)
    for b, target in enumerate(targets):
        for i in range(len(target["classes"])):
            features[b, i][target["masks"][i]] = 1.0
    return {"mask_logits": mask_logits, "class_logits": class_logits, "pixel_features": features}


def test_perfect_prediction_has_near_zero_pq_and_mask_id_loss():
    model = tiny()
    targets = two_instance_targets(size=16)
    outputs = perfect_outputs(targets, slots=6, assignment=[[4, 0, 2], [1, 5, 3]])
    terms = model.loss(outputs, targets)
    assert terms["pq"].item() < 1e-6 and terms["mask_id"].item() < 1e-6
    # Orthogonal unit features per segment: the instance term is its known minimum here.
    expected = -math.log(math.exp(1 / 0.3) / (math.exp(1 / 0.3) + 2))
    assert terms["instance"].item() == pytest.approx(expected, rel=1e-5)
    # Wrong classes on the right masks, or the right classes on swapped masks, cost a lot.
    wrong_class = {k: v.clone() for k, v in outputs.items()}
    wrong_class["class_logits"][0, 4] = wrong_class["class_logits"][0, 4].roll(1)
    assert model.loss(wrong_class, targets)["pq"].item() > 0.5
    swapped = {k: v.clone() for k, v in outputs.items()}
    swapped["mask_logits"][:, [4, 0]] = swapped["mask_logits"][:, [0, 4]]
    swapped_terms = model.loss(swapped, targets)
    assert swapped_terms["pq"].item() > 0.3 and swapped_terms["mask_id"].item() < 1e-6


def test_loss_is_invariant_to_slot_order():
    model = tiny()
    targets = two_instance_targets(size=16)
    outputs = random_outputs(seed=1)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    permuted = dict(outputs, mask_logits=outputs["mask_logits"][:, permutation],
                    class_logits=outputs["class_logits"][:, permutation])
    first, second = model.loss(outputs, targets), model.loss(permuted, targets)
    assert set(first) == {"pq", "mask_id", "instance", "semantic", "total"}
    for key in first:
        assert first[key].item() == pytest.approx(second[key].item(), rel=1e-5), key
    assert first["total"].item() == pytest.approx(
        3.0 * first["pq"].item() + 0.3 * first["mask_id"].item() + first["instance"].item()
        + first["semantic"].item(), rel=1e-6)


def test_loss_downsamples_targets_and_accepts_semantic_labels():
    model = tiny()
    targets = two_instance_targets(size=64)  # outputs are 16x16: stride 4
    terms = model.loss(random_outputs(seed=4), targets)
    assert all(torch.isfinite(v) for v in terms.values())
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 1
    labels[1, 40:, 40:] = 2
    labels[:, :2] = 255
    by_labels = model.loss(random_outputs(seed=4), labels)
    by_targets = model.loss(random_outputs(seed=4), [semantic_target(row) for row in labels])
    for key in by_labels:
        assert by_labels[key].item() == pytest.approx(by_targets[key].item()), key
    # An image with no segment at all (everything void) still gives finite terms.
    empty = {"masks": torch.zeros(0, 64, 64, dtype=torch.bool), "classes": torch.zeros(0, dtype=torch.long)}
    terms = model.loss(random_outputs(seed=5, batch=1), [empty])
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["mask_id"].item() == 0 and terms["instance"].item() == 0 and terms["pq"].item() > 0


def test_targets():
    # prepare_target: corner-aligned nearest downsampling, vanished segments dropped.
    masks = torch.zeros(3, 9, 9, dtype=torch.bool)
    masks[0, :4] = True            # rows 0..3: kept rows 0 and 4 of a 3x3 read -> row 0
    masks[1, 4:] = True            # rows 4..8
    masks[2, 0, 3] = True          # one pixel not read at 3x3 (columns 0, 4, 8)
    masks[0, 0, 3] = False
    void = torch.zeros(9, 9, dtype=torch.bool)
    void[8, 8] = True
    segments, classes, labels = prepare_target({"masks": masks, "classes": torch.tensor([1, 0, 2]), "void": void},
                                               (3, 3), NUM_CLASSES, torch.device("cpu"))
    assert classes.tolist() == [1, 0]
    assert segments.reshape(3, 3).tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, -1]]
    assert labels[0, 3] == 2 and labels[8, 8] == 255 and labels[5, 0] == 0 and labels[0, 0] == 1
    with pytest.raises(ValueError, match="overlap"):
        prepare_target({"masks": torch.ones(2, 4, 4, dtype=torch.bool), "classes": torch.tensor([1, 0])},
                       (2, 2), NUM_CLASSES, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        prepare_target({"masks": torch.ones(1, 4, 4, dtype=torch.bool), "classes": torch.tensor([3])},
                       (2, 2), NUM_CLASSES, torch.device("cpu"))

    # panoptic_target: COCO-panoptic ids + segments_info; crowd and unlisted ids are void.
    ids = np.array([[0, 5, 5], [7, 7, 9], [3, 3, 3]])
    info = [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 2, "iscrowd": 1},
            {"id": 3, "category_id": 0, "iscrowd": 0}]
    target = panoptic_target(ids, info)
    assert target["classes"].tolist() == [1, 0]
    assert target["masks"][0].tolist() == [[False, True, True], [False] * 3, [False] * 3]
    assert target["void"].tolist() == [[True, False, False], [True, True, True], [False, False, False]]


# -- inference ------------------------------------------------------------------------

def test_panoptic_rules_on_hand_built_slots():
    """4x4 image, 6 slots; ∅ column last; slot 5 (∅) takes each pixel's remaining probability."""
    probs = torch.zeros(6, 4, 4)
    probs[0, :2, :2] = 0.8          # thing, class 1 (0.9): top-left
    probs[0, 0, 0] = 0.35           # ... but one pixel below the 0.4 pixel threshold
    probs[1, :2, 2:] = 0.9          # stuff (class 0, 0.8): top-right
    probs[2, 2:, 2:] = 0.6          # stuff (class 0, 0.75): bottom-right, merged with slot 1
    probs[3, 2:, :2] = 0.9          # class 2 at 0.5 < 0.7: not kept -> its pixels void
    probs[4, 3, 1] = 0.95           # a 1-pixel thing (class 2, 0.95) under min_area 2
    probs[3, 3, 1] = 0.0
    probs[5] = 1 - probs.sum(0)
    classes = torch.tensor([[0.05, 0.9, 0.0, 0.05], [0.8, 0.1, 0.0, 0.1], [0.75, 0.0, 0.05, 0.2],
                            [0.1, 0.0, 0.5, 0.4], [0.0, 0.0, 0.95, 0.05], [0.1, 0.1, 0.1, 0.7]])
    ids, info = panoptic_from_slots(probs, classes, min_area=2)
    check_panoptic(ids, info, (4, 4))
    assert ids.tolist() == [[0, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]]
    assert info == [{"id": 1, "category_id": 1, "iscrowd": 0, "isthing": 1, "area": 3},
                    {"id": 2, "category_id": 0, "iscrowd": 0, "isthing": 0, "area": 8}]
    # With min_area 1 the small thing survives; nothing kept -> all void.
    ids, info = panoptic_from_slots(probs, classes, min_area=1)
    assert ids[3, 1] == 2 and info[1] == {"id": 2, "category_id": 2, "iscrowd": 0, "isthing": 1, "area": 1}
    ids, info = panoptic_from_slots(probs, classes, class_threshold=0.99)
    assert not ids.any() and info == []


def test_initial_no_object_probability():
    model = tiny().eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.randn(2, 3, 48, 48))["class_logits"], -1)
    assert probs.shape == (2, 16, NUM_CLASSES + 1)
    assert probs[..., -1].mean().item() == pytest.approx(0.9, abs=0.01)
    assert probs[..., -1].min().item() > 0.85 and probs[..., -1].max().item() < 0.95
    full = MaXDeepLab(21, depth=18, width=0.25)
    assert torch.softmax(full.class_head[-1].bias, 0)[-1].item() == pytest.approx(0.9)


def test_training_lowers_the_loss_and_masks_partition_the_image():
    model = tiny()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = two_instance_targets()
    backbone, heads = model.param_groups()
    optimizer = torch.optim.SGD([{"params": backbone}, {"params": heads}], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        terms = model.loss(model(images), targets)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    # Measured: ~2.8 -> ~1.45-1.5 after 8 steps (0.51-0.52 of the start, seeds 0-2).
    assert losses[-1] < 0.7 * losses[0], losses

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    probs = torch.softmax(outputs["mask_logits"], 1)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16))
    # No thresholds: every pixel lands in exactly one segment; the segments partition the image.
    for ids, info in model.predict_panoptic(images, class_threshold=0.0, pixel_threshold=0.0,
                                            min_area_fraction=0.0):
        check_panoptic(ids, info, (64, 64))
        assert (ids > 0).all() and sum(s["area"] for s in info) == 64 * 64
    # Defaults: a valid map (possibly mostly void this early).
    for ids, info in model.predict_panoptic(images):
        check_panoptic(ids, info, (64, 64))


# -- the segmenter contract -----------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"transformer_stages": ("layer3", "layer4"), "semantic_source": "head"},
                                    {"aux": False, "output_stride": 8}])
def test_contract(kwargs):
    model = tiny(**kwargs)
    assert_param_groups_partition(model)
    _, heads = model.param_groups()
    assert id(model.memory) in {id(p) for p in heads}

    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    assert outputs["mask_logits"].shape == (1, 16, 17, 13)       # stride 4
    assert outputs["pixel_features"].shape == (1, 32, 17, 13)
    torch.testing.assert_close(outputs["pixel_features"].norm(dim=1), torch.ones(1, 17, 13))
    assert ("semantic" in outputs) == (model.semantic_head is not None)
    if model.semantic_source == "masks":
        # predict() gives the panoptic output's class probabilities (∅ renormalised away).
        masks = torch.softmax(outputs["mask_logits"], 1)
        classes = torch.softmax(outputs["class_logits"], -1)[..., :-1]
        expected = torch.einsum("bnhw,bnc->bchw", masks, classes)
        torch.testing.assert_close(torch.softmax(outputs["out"], 1), expected / expected.sum(1, keepdim=True))
    else:
        assert torch.equal(outputs["out"], outputs["semantic"])
    assert len(model.blocks) == len(kwargs.get("transformer_stages", ("layer4",)))


def test_paper_sizes_and_argument_errors():
    full = MaXDeepLab(21, depth=50)
    assert full.memory.shape == (128, 256)
    assert full.mask_head[-1].out_features == 128 and full.class_head[-1].out_features == 22
    assert full.mask_norm.num_features == 128
    assert full.backbone.strides_of["layer4"] == 16
    with pytest.raises(ValueError, match="transformer_stages"):
        MaXDeepLab(3, depth=18, width=0.25, transformer_stages=("layer2",))
    with pytest.raises(ValueError, match="semantic_source"):
        MaXDeepLab(3, depth=18, width=0.25, aux=False, semantic_source="head")
    with pytest.raises(ValueError, match="num_heads"):
        MaXDeepLab(3, depth=18, width=0.25, memory_channels=60, num_heads=8)
