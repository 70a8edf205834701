"""Training checkpoints: written atomically, read back whole or not at all."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

FORMAT = "densenet_fast-train-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, model_config: dict, history: list) -> Path:
    """Write model, optimizer, completed epochs, metrics and RNG states to ``path``: into a
    temporary file in the same folder first, then renamed over ``path``, so a crash leaves
    either the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT, "version": VERSION, "model_config": model_config,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "history": history,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, model_config: dict) -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint` for a model built from
    ``model_config``. Raises ``ValueError`` naming the problem (missing, truncated, foreign,
    another architecture) before anything is loaded into a model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all unreadable here
        raise ValueError(f"checkpoint {path} is unreadable (truncated, or not a torch "
                         f"checkpoint): {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by 'densenet-fast train'")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}, "
                         f"this densenet_fast reads version {VERSION}")
    if state["model_config"] != model_config:
        raise ValueError(f"{path} holds a model built with {state['model_config']}, but this "
                         f"run builds {model_config}")
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checked checkpoint into the model, optimizer and RNGs. Shapes are compared
    first, so a mismatch changes nothing."""
    current = model.state_dict()
    bad = [k for k, v in state["model"].items() if k not in current or current[k].shape != v.shape]
    missing = [k for k in current if k not in state["model"]]
    if bad or missing:
        raise ValueError(f"checkpoint does not fit the model: unexpected or mis-shaped "
                         f"{bad[:3]}, missing {missing[:3]}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
