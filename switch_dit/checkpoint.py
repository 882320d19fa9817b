"""Checkpoints: written atomically (temp file, fsync, rename), the last K kept, loaded onto CPU first.

Loading never runs code from the file: torch's weights-only unpickler builds tensors and plain containers
only. Objects of classes a checkpoint merely carries along (the OmegaConf config in the authors'
checkpoints, DiT's argparse Namespace) become inert ``UnloadedObject`` stand-ins, without importing their
modules; a file that refers to anything else (os.system, eval, ...) is refused with a one-line error.
"""
from __future__ import annotations

import os
import pickle
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


class UnloadedObject:
    """Inert stand-in for an object whose class a checkpoint names but we do not import (its pickled state
    is kept in ``state`` for inspection; none of its code runs)."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<unloaded {self.qualname}>"


# Classes a checkpoint may carry beside its tensors that we stand in for rather than import: configs of the
# authors' code (OmegaConf, via hydra) and of DiT-style scripts (argparse), and the plain types they pickle.
_STANDIN_PREFIXES = ("omegaconf.", "typing.", "collections.", "enum.", "pathlib.")
_STANDIN_NAMES = {"argparse.Namespace", "copyreg._reconstructor", "builtins.object", "builtins.dict",
                  "builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset", "builtins.int",
                  "builtins.float", "builtins.str", "builtins.bool", "builtins.bytes", "builtins.type"}


def _numpy_globals() -> list:
    """numpy arrays (the RNG state in checkpoints of earlier versions) are data, not code: load them for real."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    found += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.uint8, np.int32)]
    return found


def load(path: str | os.PathLike) -> dict:
    """Load onto CPU without running code from the file (see the module docstring); a truncated or corrupt
    file, or one that refers to code, gives a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    except Exception as e:  # zip reader errors, EOF
        raise _corrupt(path, e) from e
    try:  # which globals did it need? (read from the pickle's opcodes, nothing executed)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise _corrupt(path, e) from e
    numpy_names = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    names = [n for n in names if n not in numpy_names]
    if not names:
        raise _corrupt(path, first_error) from first_error
    refused = [n for n in names if not (n in _STANDIN_NAMES or n.startswith(_STANDIN_PREFIXES))]
    if refused:
        raise CheckpointError(
            f"{path} refers to code ({', '.join(refused[:4])}), not only weights and plain data; refused, and "
            "nothing in it was run. Load it only if you trust its author, and save its state dict instead")
    standins = [(type(n.rsplit(".", 1)[-1], (UnloadedObject,), {"qualname": n}), n) for n in names]
    try:
        with torch.serialization.safe_globals(_numpy_globals() + standins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _corrupt(path, e) from e


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''}); resume from an earlier "
                           "checkpoint or delete this file")


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
