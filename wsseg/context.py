"""What a stage is handed: `StageContext` (config, run store, folders, device, rank, log, progress).

Also the few process-level facts every stage shares: which device to use, whether we
run under `torchrun` (rank, world size, barrier), and how progress is shown (a tqdm bar
on a terminal, a plain line every few percent in a log file).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import torch

from wsseg.config import Config
from wsseg.errors import UserError
from wsseg.store import RunStore

T = TypeVar("T")
log = logging.getLogger("wsseg")


# ---------------------------------------------------------------------------- devices

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`run.device`: auto | cpu | cuda | cuda:N. Under torchrun, cuda means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device: {name} was asked for but CUDA is not available here; use run.device=cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"run.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (no autocast) on CPU or with amp off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every world_size-th item, so shards are balanced and disjoint."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def total(self, counts: dict[str, int]) -> dict[str, int]:
        """`counts` summed over all ranks; every rank must call it, with the same keys."""
        if not self.enabled:
            return dict(counts)
        keys = sorted(counts)
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
        summed = torch.tensor([int(counts[k]) for k in keys], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(summed)
        return dict(zip(keys, summed.tolist()))


def init_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


# ---------------------------------------------------------------------------- progress

class Progress:
    """A progress display: tqdm on a terminal, a plain log line every `every` percent otherwise."""

    def __init__(self, iterable: Iterable[T] | None, total: int | None, desc: str, enabled: bool = True, every: float = 10.0):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.enabled = enabled
        self.every = every
        self.count = 0
        self.start = time.monotonic()
        self._next_report = every
        self.min_interval = 5.0  # seconds between plain lines: a log is for reading, not scrolling
        self._last_line = self.start
        self._bar = None
        self.postfix = ""
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="it", dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.count += n
        if postfix:
            self.postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        if self.total:
            percent = 100.0 * self.count / self.total
            now = time.monotonic()
            due = percent + 1e-9 >= self._next_report and now - self._last_line >= self.min_interval
            if due or (self.count == self.total and now - self.start >= self.min_interval):
                self._last_line = now
                elapsed = time.monotonic() - self.start
                rate = self.count / elapsed if elapsed > 0 else 0.0
                eta = (self.total - self.count) / rate if rate > 0 else 0.0
                extra = f" {self.postfix}" if self.postfix else ""
                log.info("%s: %d/%d (%.0f%%) %.2f it/s, eta %.0fs%s", self.desc, self.count, self.total, percent, rate, eta, extra)
                while self._next_report <= percent:
                    self._next_report += self.every

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()


# ---------------------------------------------------------------------------- the context

@dataclass
class StageContext:
    """Everything a stage's `run(ctx)` needs; stages never look at globals."""

    config: Config
    store: RunStore
    name: str
    device: torch.device
    dist: Distributed = field(default_factory=Distributed)
    force: bool = False
    log: logging.Logger = log

    def folder(self, relative: str) -> Path:
        """A folder of the run directory (created)."""
        path = self.store.folder(relative)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, iterable: Iterable[T] | None = None, total: int | None = None, desc: str | None = None) -> Progress:
        return Progress(iterable, total, desc or self.name, enabled=self.dist.is_main)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.device, self.config.run.amp)
