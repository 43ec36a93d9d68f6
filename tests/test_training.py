"""The shared training loop's schedule and optimisers."""

import pytest
import torch

from wsseg.training import adamw, set_poly_lr, sgd


def _lrs(optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_warmup_ramps_linearly_then_the_poly_schedule_takes_over():
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = sgd([([weights[0]], 0.1), ([weights[1]], 1.0)], momentum=0.9, weight_decay=0.0)
    max_steps, warmup = 100, 10
    for step in (0, 4, 9, 10, 50, 99):
        set_poly_lr(optimizer, step, max_steps, 0.9, warmup)
        poly = (1 - step / max_steps) ** 0.9
        ramp = (step + 1) / warmup if step < warmup else 1.0
        assert _lrs(optimizer) == pytest.approx([0.1 * poly * ramp, 1.0 * poly * ramp])
    set_poly_lr(optimizer, 9, max_steps, 0.9, 0)  # no warmup: the plain poly value
    assert _lrs(optimizer)[1] == pytest.approx((1 - 9 / 100) ** 0.9)


def test_adamw_decays_weights_apart_from_the_gradient():
    """With a zero gradient Adam's step is zero, so what moves the weight is the decoupled decay
    lr·weight_decay·w alone (torch's Adam with weight_decay would add it to the gradient, and
    Adam's normalisation would turn it into a step of about lr)."""
    weight = torch.nn.Parameter(torch.full((3,), 2.0))
    optimizer = adamw([([weight], 0.1)], weight_decay=0.5)
    weight.grad = torch.zeros(3)
    optimizer.step()
    assert weight.detach() == pytest.approx(torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))
    assert optimizer.param_groups[0]["base_lr"] == 0.1


# ---------------------------------------------------------------------------- the per-step log

class _Points(torch.utils.data.Dataset):
    """Eight fixed 2-d points with a linear target."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 2, generator=generator)
        self.y = self.x @ torch.tensor([1.5, -2.0])

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}


class _Stop(Exception):
    pass


def _run(tmp_path, epochs: int, stop_at_step: int | None = None, tensorboard: bool = True):
    """train() a 2-weight linear model for `epochs` (2 steps each) in a run under tmp_path; the
    loss raises at `stop_at_step` (a kill in the middle of an epoch)."""
    from wsseg.config import load_config
    from wsseg.context import StageContext
    from wsseg.store import RunStore
    from wsseg.training import train

    config = load_config([], [f"run.dir={tmp_path / 'run'}", f"run.tensorboard={str(tensorboard).lower()}",
                              "run.workers=0"])
    store = RunStore(tmp_path / "run")
    ctx = StageContext(config=config, store=store, name="train-test", device=torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = sgd([(list(model.parameters()), 0.1)], momentum=0.0, weight_decay=0.0)
    seen = []

    def loss_fn(net, batch):
        if stop_at_step is not None and len(seen) == stop_at_step:
            raise _Stop
        seen.append(1)
        error = (net(batch["x"]).squeeze(1) - batch["y"]) ** 2
        return {"total": error.mean(), "max": error.max()}

    folder = store.folder("test")
    folder.mkdir(parents=True, exist_ok=True)
    result = train(ctx, model=model, optimizer=optimizer, dataset=_Points(), batch_size=4, epochs=epochs,
                   loss_fn=loss_fn, checkpoint=folder / "checkpoint.pt", seed=0,
                   after_epoch=lambda net, epoch: {"score": float(epoch)})
    return result, folder


def test_every_step_is_logged_and_a_resume_continues_the_same_log(tmp_path):
    """Per-step loss terms, lr and images/s in RUN/<folder>/curves/<phase>.json; a run killed in
    its third epoch and resumed gives the same log as one that never stopped (the cut-off
    epoch's steps are not kept twice), and TensorBoard's reader sees each step once."""
    import json

    from wsseg.training import set_poly_lr

    whole, _ = _run(tmp_path / "whole", epochs=4)
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", epochs=4, stop_at_step=5)  # after epochs 1-2 (4 steps) and one step of epoch 3
    resumed, folder = _run(tmp_path / "cut", epochs=4)
    log = json.loads((folder / "curves" / "train.json").read_text())
    assert log["steps"] == list(range(8)) and log["phase"] == "train" and log["stage"] == "train-test"
    assert log["series"]["total"] == whole.log["series"]["total"]  # same losses, no step twice
    assert log == resumed.log
    # the per-step means are the epoch curve's values
    assert [sum(log["series"]["total"][i:i + 2]) / 2 for i in (0, 2, 4, 6)] == pytest.approx(resumed.curves["total"], rel=1e-4)
    probe = sgd([([torch.nn.Parameter(torch.zeros(1))], 0.1)], momentum=0.0, weight_decay=0.0)
    expected = []
    for step in range(8):
        set_poly_lr(probe, step, 8)
        expected.append(probe.param_groups[0]["lr"])
    assert log["series"]["lr"] == pytest.approx(expected, rel=1e-5)
    assert all(v > 0 for v in log["series"]["images_per_second"])
    assert log["epoch_steps"] == [1, 3, 5, 7] and log["epoch_series"]["score"] == [1.0, 2.0, 3.0, 4.0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cut" / "run" / "tb" / "train-test" / "train"))
    events.Reload()
    assert {"loss/total", "loss/max", "lr", "images_per_second", "epoch/score"} <= set(events.Tags()["scalars"])
    totals = events.Scalars("loss/total")
    assert [e.step for e in totals] == list(range(8))  # the cut-off step 4 purged, written once again
    assert [e.value for e in totals] == pytest.approx(log["series"]["total"], rel=1e-4)


def test_a_resumed_phase_event_file_sorts_after_the_cut_off_ones(tmp_path):
    """TensorBoard reads a folder's event files in name order and purges only earlier files; a file
    made in the same second by the same host and process sorts by its writer counter as a string
    (9 after 10: it made test_every_step_is_logged... fail in a pytest worker that had made ten
    writers), so the resume must wait for a later second."""
    import os
    import socket
    import time

    from wsseg.steplog import StepLog

    folder = tmp_path / "tb"
    folder.mkdir()
    # this process's own host and id, and a counter above the one its next writer takes
    cut_off = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.99999"
    cut_off.write_bytes(b"")
    log = StepLog(tmp_path / "curves.json", "train", "train-test", tensorboard=folder, start_step=3)
    log.writer.flush()
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0] == cut_off.name, names
    log.writer.close()


def test_no_event_files_with_tensorboard_off(tmp_path):
    _, folder = _run(tmp_path, epochs=1, tensorboard=False)
    assert (folder / "curves" / "train.json").exists()
    assert not (tmp_path / "run" / "tb").exists()


def test_tensorboard_on_without_the_package_is_one_clear_error(monkeypatch):
    from wsseg import steplog
    from wsseg.errors import UserError

    monkeypatch.setattr(steplog, "tensorboard_available", lambda: False)
    assert steplog.tensorboard_on(None) is False  # the default quietly stays off
    with pytest.raises(UserError, match=r"run.tensorboard: true.*pip install"):
        steplog.tensorboard_on(True)
