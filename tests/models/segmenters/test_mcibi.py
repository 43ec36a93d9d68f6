"""MCIBI: the memory update against hand-computed values, the memory as a buffer, the
consistency loss and its gating, the distributed update, and the segmenter contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsseg.models.segmenters.mcibi import MCIBI, apply_update, class_statistics, memory_momentum
from segmenter_batches import assert_param_groups_partition, fixed_batch, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> MCIBI:
    torch.manual_seed(seed)
    return MCIBI(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def unit(index: int, dims: int) -> torch.Tensor:
    vector = torch.zeros(dims)
    vector[index] = 1.0
    return vector


def test_momentum_schedule():
    assert memory_momentum(0, 10) == pytest.approx(0.9)
    assert memory_momentum(5, 10) == pytest.approx(0.9 * 0.5 ** 0.9)
    assert memory_momentum(10, 10) == 0.0


def test_memory_update_by_hand():
    model = tiny()
    dims = model.channels
    e0, e1, e2, e3 = (unit(i, dims) for i in range(4))
    with torch.no_grad():
        model.memory[1] = e0
        model.initialised[1] = True
        model.memory[3] = 5 * e3  # initialised, absent from the batch: untouched
        model.initialised[3] = True
    # Features on a 2x3 grid; labels at 3x5 are read at rows (0, 2), columns (0, 2, 4).
    pixels = [[2 * e0, e1, e0 + e1], [3 * e2, e0, 100 * e3]]
    features = torch.stack([torch.stack(row, dim=-1) for row in pixels], dim=-2)[None]  # (1, D, 2, 3)
    labels = torch.full((1, 3, 5), 4, dtype=torch.long)  # class 4 only where never read
    labels[0, 0, 0] = labels[0, 0, 2] = labels[0, 0, 4] = 1
    labels[0, 2, 0] = labels[0, 2, 2] = 2
    labels[0, 2, 4] = 255
    model.after_step({"features": features}, labels, step=5, max_steps=10)

    t = 0.9 * 0.5 ** 0.9
    # Class 1, memory e0: 1 − cos is 0 for 2·e0, 1 for e1, 1 − 1/√2 for e0 + e1.
    w = [0.0, 1.0, 1 - 1 / math.sqrt(2)]
    mean_weighted = (w[1] * e1 + w[2] * (e0 + e1)) / sum(w)
    torch.testing.assert_close(model.memory[1], (1 - t) * e0 + t * mean_weighted)
    # Class 2 was empty: its first write is the plain mean.
    torch.testing.assert_close(model.memory[2], (3 * e2 + e0) / 2)
    torch.testing.assert_close(model.memory[3], 5 * e3)
    assert torch.equal(model.memory[0], torch.zeros(dims)) and torch.equal(model.memory[4], torch.zeros(dims))
    assert model.initialised.tolist() == [False, True, True, True, False]
    assert int(model.steps_done) == 6

    # All pixels along the memory vector: Σ(1 − cos) = 0 falls back to the mean.
    features = torch.stack([2 * e0, 4 * e0], dim=-1)[None, :, None, :]  # (1, D, 1, 2)
    model.after_step({"features": features}, torch.ones(1, 1, 2, dtype=torch.long), step=0, max_steps=10)
    torch.testing.assert_close(model.memory[1], 0.1 * ((1 - t) * e0 + t * mean_weighted) + 0.9 * 3 * e0)


def test_statistics_add_over_ranks():
    """The distributed update sums per-class statistics: two halves of a batch summed give
    the whole batch's statistics and so the same update."""
    torch.manual_seed(0)
    memory = torch.randn(4, 6)
    memory[2] = 0
    initialised = torch.tensor([True, True, False, True])
    features = torch.randn(4, 6, 3, 3)
    labels = torch.randint(0, 4, (4, 3, 3))
    labels[0, 0] = 255
    labels[labels == 3] = 1  # class 3 absent
    whole = class_statistics(features, labels, memory, initialised)
    halves = (class_statistics(features[:2], labels[:2], memory, initialised)
              + class_statistics(features[2:], labels[2:], memory, initialised))
    torch.testing.assert_close(halves, whole)
    updated, flags = memory.clone(), initialised.clone()
    apply_update(updated, flags, halves, 0.5)
    assert torch.equal(updated[3], memory[3]) and flags.tolist() == [True, True, True, True]
    mask = labels == 2
    torch.testing.assert_close(updated[2], features.permute(0, 2, 3, 1)[mask].mean(0))
    with pytest.raises(ValueError, match="0..3"):
        class_statistics(features, torch.full((4, 3, 3), 7), memory, initialised)


def _distributed_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = tiny()
        generator = torch.Generator().manual_seed(1)
        features = torch.randn(4, model.channels, 3, 3, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (4, 3, 3), generator=generator)
        for step in range(2):  # a first write, then a cosine-weighted update
            part = slice(2 * rank, 2 * rank + 2)
            model.after_step({"features": features[part] + step}, labels[part], step, 4)
        results[rank] = model.memory.clone()
    finally:
        dist.destroy_process_group()


def test_distributed_update_equals_the_global_batch(tmp_path):
    with mp.Manager() as manager:
        shared = manager.dict()
        # fork: the children inherit the imports (spawn would re-import torch, ~3 s each).
        mp.start_processes(_distributed_worker, args=(str(tmp_path / "init"), shared), nprocs=2,
                           start_method="fork")
        results = dict(shared)
    single = tiny()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, single.channels, 3, 3, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (4, 3, 3), generator=generator)
    for step in range(2):
        single.after_step({"features": features + step}, labels, step, 4)
    torch.testing.assert_close(results[0], single.memory)
    torch.testing.assert_close(results[1], single.memory)


def test_memory_is_a_buffer_and_gets_no_gradient():
    model = tiny()
    names = {name for name, _ in model.named_parameters()}
    assert not {"memory", "initialised", "steps_done"} & names
    state = model.state_dict()
    assert state["memory"].shape == (NUM_CLASSES, model.channels)
    assert state["initialised"].dtype == torch.bool and "steps_done" in state

    images, labels = fixed_batch()
    model.after_step(model(images), labels, 0, 10)  # fills the memory
    restored = tiny(seed=1)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.memory, model.memory) and torch.equal(restored.initialised, model.initialised)

    before = model.memory.clone()
    terms = model.loss(model(images), labels)
    assert terms["memory"] > 0  # on from step 0 (memory_loss_after_step=0), classes 0..4 initialised
    terms["memory"].backward()
    assert not model.memory.requires_grad and model.memory.grad is None
    assert torch.equal(model.memory, before)
    conv = model.final_head[0][0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert model.representation[0].weight.grad is None  # the memory path starts at H2


def test_memory_logits_leave_batchnorm_statistics_alone():
    model = tiny()
    with torch.no_grad():
        model.memory.normal_()
    bn = model.final_head[0][1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    mean, var, batches = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    model.train()
    logits = model.memory_logits()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, batches)
    # The same as H2 in eval mode on the memory rows.
    model.eval()
    with torch.no_grad():
        expected = model.final_head(model.memory[:, :, None, None]).flatten(1)
    torch.testing.assert_close(logits.detach(), expected)


def test_memory_loss_turns_on_after_the_given_step():
    model = tiny(memory_loss_after_step=2)
    images, labels = fixed_batch()
    with torch.no_grad():
        model.memory[:2] = torch.randn(2, model.channels)
        model.initialised[:2] = True
    outputs = model(images)
    assert not model.memory_loss_active
    assert model.loss(outputs, labels)["memory"] == 0
    model.steps_done.fill_(2)  # what after_step(step=1) leaves
    assert model.memory_loss_active
    terms = model.loss(outputs, labels)
    rows = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(outputs["memory_logits"][rows], rows)
    torch.testing.assert_close(terms["memory"], expected)
    assert list(terms) == ["main", "stage1", "memory", "aux", "total"]
    torch.testing.assert_close(terms["total"], terms["main"] + 0.4 * terms["stage1"] + terms["memory"]
                               + 0.4 * terms["aux"])


def test_contract():
    model = tiny()
    losses, history = train_steps(model, lr=0.01)
    main = [terms["main"].item() for terms in history]
    # The memory term joins at step 1 (the memory is empty at step 0). Measured: the
    # total ends at ~0.66 of step 1's, the main term at ~0.32 of its start.
    assert losses[-1] < 0.8 * losses[1], losses
    assert main[-1] < 0.5 * main[0], main
    assert int(model.steps_done) == 10 and bool(model.initialised.all())

    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    for key in ("out", "stage1", "aux"):
        assert outputs[key].shape == (1, NUM_CLASSES, 9, 7)  # OS8
    assert outputs["features"].shape == (1, model.channels, 9, 7)
    # The prediction reads the memory.
    with torch.no_grad():
        model.memory.mul_(-1)
        assert not torch.allclose(model.predict(x), first)
    assert_param_groups_partition(model)


@pytest.mark.parametrize("kwargs, size", [({"aspp_fusion": False}, (9, 7)), ({"output_stride": 16}, (5, 4))])
def test_options(kwargs, size):
    model = tiny(**kwargs).eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        outputs = model(x)
        prediction = model.predict(x)
    assert outputs["out"].shape == (1, NUM_CLASSES, *size)
    assert prediction.shape == (1, NUM_CLASSES, 65, 49)
    assert hasattr(model, "aspp") == model.aspp_fusion


def test_head_widths_follow_the_backbone():
    full = MCIBI(21, depth=50)
    assert full.representation[0].in_channels == 2048 and full.representation[0].out_channels == 512
    assert full.memory.shape == (21, 512)
    assert full.memory_attention.query[0][0].out_channels == 256
    assert full.aspp.rates == (12, 24, 36)  # OS8
    assert full.backbone.strides_of["layer4"] == 8
    assert full.aux_head.conv[0].out_channels == 256
