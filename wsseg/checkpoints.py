"""Checkpoint files: torch payloads written atomically and read without unpickling code.

Below the stages and the training loop, which both save and load through here. A
payload holds tensors, numbers, strings, lists and dicts only, so reading it with
`weights_only=True` never runs code from a file someone else made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wsseg.errors import UserError
from wsseg.store import atomic_path


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically: a file that exists is whole."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, what: str) -> dict:
    """Read a payload written by `save_checkpoint`; `what` names it in the one-line errors."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; run the stage that makes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any damage or a refused pickle is the same to the user
        raise UserError(f"{path}: cannot load {what} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                        f"rerun the stage with --force") from None


def load_trained(model: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """`model` (built with the architecture the file was saved from) with the weights of a
    stage's `{"model": state dict}` file, in eval mode."""
    model.load_state_dict(load_checkpoint(path, what)["model"])
    return model.eval()
