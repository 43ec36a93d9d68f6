"""The training loop every training stage shares (train-cam, train-irn, train-segmenter).

SGD (or Adam) with per-group learning rates and the poly schedule lr·(1 − step/max_step)^0.9,
reproducible sampling (the order depends on seed and epoch only, not on workers or
resumes), AMP on CUDA, DistributedDataParallel under torchrun, a checkpoint written
atomically after every epoch and resumed from after a kill, and a NaN/inf guard that
stops with a message while keeping the last good checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from wsseg.context import StageContext
from wsseg.errors import RunFailure, UserError
from wsseg.checkpoints import load_checkpoint, save_checkpoint
from wsseg.steplog import CURVES_FOLDER, StepLog, phase_slug, tensorboard_on

LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


def _base_lr_groups(groups: list[tuple[list[nn.Parameter], float]], hint: str = "") -> list[dict]:
    """torch param groups from (params, lr) pairs, empty ones left out, each remembering its base lr
    for the schedule; none left is a UserError (`hint` says what to check)."""
    param_groups = [{"params": params, "lr": lr, "base_lr": lr} for params, lr in groups if params]
    if not param_groups:
        raise UserError(f"nothing to train: every parameter is frozen{hint}")
    return param_groups


def sgd(groups: list[tuple[list[nn.Parameter], float]], *, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over (params, lr) groups; each group remembers its base lr for the poly schedule."""
    param_groups = _base_lr_groups(groups, "; check the train_stages / train_backbone keys")
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)


def adam(groups: list[tuple[list[nn.Parameter], float]], *, weight_decay: float) -> torch.optim.Adam:
    """Adam over (params, lr) groups (L2 weight decay added to the gradient, torch's Adam), each
    group remembering its base lr like sgd()'s."""
    param_groups = _base_lr_groups(groups)
    return torch.optim.Adam(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)


def adamw(groups: list[tuple[list[nn.Parameter], float]], *, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, applied as lr·weight_decay·w each step) over (params, lr)
    groups, each remembering its base lr like sgd()'s."""
    param_groups = _base_lr_groups(groups)
    return torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, max_steps: int, power: float = 0.9,
                warmup_steps: int = 0) -> None:
    """lr = base_lr·(1 − step/max_steps)^power, times a linear ramp (step+1)/warmup_steps over the
    first `warmup_steps` steps."""
    factor = (1.0 - min(step, max_steps) / max_steps) ** power
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class _SeededShuffle(Sampler):
    """A permutation that depends only on (seed, epoch): resume and worker counts don't change it.

    Under torchrun, rank r of `world` takes every world-th item of the same permutation (cut
    to a multiple of world), so each global batch holds exactly the images a single process
    would have batched together; torch's DistributedSampler draws a different permutation
    and so trains on other images than the same run in one process.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.epoch = size, seed, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        return iter(order[: len(self) * self.world][self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.size // self.world


def make_loader(ctx: StageContext, dataset: Dataset, batch_size: int, *, seed: int) -> DataLoader:
    """Batches of `batch_size` images over all ranks (each rank batch_size / world_size)."""
    world = ctx.dist.world_size
    if batch_size % world:
        raise UserError(f"batch size {batch_size} is not divisible by the {world} processes; choose a multiple of {world}")
    per_rank = batch_size // world
    if len(dataset) < batch_size:
        raise UserError(
            f"{ctx.name}: the training list has {len(dataset)} images, fewer than one batch of {batch_size}; "
            f"lower the batch size or use a longer list"
        )
    sampler = _SeededShuffle(len(dataset), seed, rank=ctx.dist.rank, world=world)
    workers = ctx.config.run.workers
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)


@dataclass
class TrainResult:
    curves: dict[str, list[float]] = field(default_factory=dict)  # per-epoch mean of each loss term
    log: dict = field(default_factory=dict)  # the per-step log (wsseg.steplog.StepLog.state())
    steps: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0


def _move(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(ctx: StageContext, *, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, batch_size: int,
          epochs: int, loss_fn: LossFn, checkpoint: Path, seed: int, after_step: Callable[[nn.Module, dict, int, int], None] | None = None,
          phase: str = "train", lr_power: float = 0.9, warmup_steps: int = 0,
          after_epoch: Callable[[nn.Module, int], dict[str, float]] | None = None) -> TrainResult:
    """Train `model` for `epochs`, resuming from `checkpoint` if it exists.

    `loss_fn(model, batch)` returns named loss terms including "total". The model may be
    wrapped in DDP inside; `loss_fn` must only call it (and read `.module` for attributes).
    `after_step(model, batch, step, max_steps)` runs after each optimiser step (e.g. a
    memory update). `lr_power`: the poly schedule's power (0 keeps every lr constant);
    `warmup_steps`: a linear ramp of every lr over the first steps. `after_epoch(model, epoch)`
    runs after each epoch (epoch counted from 1) and returns extra curve values (e.g. a
    validation score), appended to the curves and kept in the checkpoint like the losses.
    Every step's loss terms, learning rate (the first parameter group's) and images/s go to the
    phase's step log (`<checkpoint folder>/curves/<phase>.json`, and TensorBoard under
    RUN/tb/<stage>/<phase> when `run.tensorboard` is on), kept in the checkpoint like the curves.
    Returns the loss curves; the model's weights are trained in place.
    """
    loader = make_loader(ctx, dataset, batch_size, seed=seed)
    steps_per_epoch = len(loader)
    result = TrainResult()
    start_epoch = 0
    logged: dict | None = None
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, "training checkpoint")
        if state.get("phase") == phase:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
            result.curves = {k: list(v) for k, v in state["curves"].items()}
            logged = state.get("log")
            ctx.log.info("%s: resuming %s from epoch %d/%d", ctx.name, phase, start_epoch, epochs)
    model.to(ctx.device)
    trained: nn.Module = model
    if ctx.dist.enabled:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # A model whose forward leaves parameters without a gradient in some steps says so
        # (dilated-context's front-end stage); DDP must then look for them.
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=getattr(model, "find_unused_parameters", False))
    log = None
    if ctx.dist.is_main:
        slug = phase_slug(phase)
        board = ctx.store.folder("tb") / ctx.name / slug if tensorboard_on(ctx.config.run.tensorboard) else None
        log = StepLog(checkpoint.parent / CURVES_FOLDER / f"{slug}.json", phase, ctx.name, state=logged,
                      tensorboard=board, start_step=start_epoch * steps_per_epoch)
    try:
        _epochs(ctx, result, log, trained=trained, model=model, optimizer=optimizer, loader=loader, dataset=dataset,
                batch_size=batch_size, start_epoch=start_epoch, epochs=epochs, loss_fn=loss_fn, checkpoint=checkpoint,
                after_step=after_step, phase=phase, lr_power=lr_power, warmup_steps=warmup_steps,
                after_epoch=after_epoch)
    finally:
        if log is not None:
            log.close()
    if log is not None:
        result.log = log.state()
    return result


def _epochs(ctx: StageContext, result: TrainResult, log: StepLog | None, *, trained: nn.Module, model: nn.Module,
            optimizer: torch.optim.Optimizer, loader: DataLoader, dataset: Dataset, batch_size: int, start_epoch: int,
            epochs: int, loss_fn: LossFn, checkpoint: Path, after_step, phase: str, lr_power: float,
            warmup_steps: int, after_epoch) -> None:
    """train()'s loop over the epochs left, filling `result` and `log`."""
    steps_per_epoch = len(loader)
    max_steps = epochs * steps_per_epoch
    amp_dtype = ctx.amp_dtype
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    began = time.monotonic()
    images = 0
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        trained.train()
        sums: dict[str, float] = {}
        count = 0
        bar = ctx.progress(total=steps_per_epoch, desc=f"{ctx.name} {phase} epoch {epoch + 1}/{epochs}")
        last = time.monotonic()
        for index, batch in enumerate(loader):
            step = epoch * steps_per_epoch + index
            set_poly_lr(optimizer, step, max_steps, lr_power, warmup_steps)
            batch = _move(batch, ctx.device)
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = loss_fn(trained, batch)
            total = terms["total"]
            if not torch.isfinite(total.detach()):
                bar.close()
                # the checkpoint on disk is the one written after the previous epoch
                kept = f"the last good checkpoint ({checkpoint.name}, epoch {epoch}) is kept" if epoch else "no checkpoint was written yet"
                raise RunFailure(f"{ctx.name}: the loss became {total.item()} at epoch {epoch + 1}, step {index + 1}; "
                                 f"training stopped and {kept}; lower the learning rate and rerun")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step(trained, batch, step, max_steps)
            values = {name: float(value.detach()) for name, value in terms.items()}
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            count += 1
            images += batch_size
            now = time.monotonic()
            if log is not None:  # this process's batch; images/s of the whole job (all processes)
                log.add_step(step, {**values, "lr": optimizer.param_groups[0]["lr"],
                                    "images_per_second": batch_size / max(now - last, 1e-9)})
            last = now
            bar.update(1, postfix=f"loss {float(total.detach()):.4f}")
        bar.close()
        means = {name: _global_mean(ctx, value / max(count, 1)) for name, value in sums.items()}
        if after_epoch is not None:
            measured = after_epoch(model, epoch + 1)
            means.update(measured)
            if log is not None:
                log.add_epoch((epoch + 1) * steps_per_epoch - 1, measured)
            trained.train()
        for name, value in means.items():
            result.curves.setdefault(name, []).append(round(value, 6))
        ctx.log.info("%s: %s epoch %d/%d %s", ctx.name, phase, epoch + 1, epochs,
                     " ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if ctx.dist.is_main:
            save_checkpoint(checkpoint, {"phase": phase, "epoch": epoch + 1, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "curves": result.curves,
                                    "log": log.state() if log is not None else None})
            if log is not None:
                log.flush()
        ctx.dist.barrier()
    result.steps = max_steps
    result.seconds = time.monotonic() - began
    result.images_per_second = images / result.seconds if result.seconds > 0 and images else 0.0


def _global_mean(ctx: StageContext, value: float) -> float:
    if not ctx.dist.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / ctx.dist.world_size


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
