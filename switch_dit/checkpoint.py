"""Checkpoints: written atomically (temp file, fsync, rename), the last K kept, loaded onto CPU first."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

FORMAT = "switch-dit/train-state/1"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """Save so that a crash leaves either the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(ckpt_dir: str | os.PathLike, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_dir)[:-keep_last]:
        p.unlink(missing_ok=True)


def load(path: str | os.PathLike) -> dict:
    """Load onto CPU; a truncated or corrupt file gives a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip reader errors, unpickling errors, EOF
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); "
                              "resume from an earlier checkpoint or delete this file") from e


def resolve_resume(resume: str | None, results_dir: str | os.PathLike) -> Path | None:
    """--resume PATH, or 'auto' = the newest checkpoint under results_dir/checkpoints (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(Path(results_dir) / "checkpoints")
        return found[-1] if found else None
    p = Path(resume)
    if not p.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file (use 'auto' for the newest in the results dir)")
    return p
