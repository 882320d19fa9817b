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
MODEL_FORMAT = "switch-dit/model/1"  # an exported model: EMA weights in safetensors, the config in its metadata
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, file-size limit, read-only folder); the previous ones are intact."""


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """Save so that a crash leaves either the old file or the complete new one, never a partial file.
    A failed write removes its temp file and raises a one-line CheckpointWriteError naming folder, cause and fix."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; others and other uids read checkpoints as any file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer reports write failures so
        written = os.path.getsize(tmp) if tmp is not None and os.path.exists(tmp) else 0
        raise CheckpointWriteError(_write_failure(path, e, written)) from None
    except BaseException:
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure(path: Path, e: Exception, written: int) -> str:
    import errno
    import resource
    import shutil

    code = getattr(e, "errno", None)
    text = str(e).lower()
    # torch's zip writer hides the errno ("unexpected pos ..."): look at the limits ourselves
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or "no space" in text or (code is None and free is not None and free < (1 << 20)):
        cause, fix = "the disk is full", "free space (or lower --keep-last) and resume with --resume auto"
    elif code == errno.EFBIG or "file too large" in text or (
            code is None and fsize != resource.RLIM_INFINITY and written >= fsize - (1 << 16)):
        cause, fix = "the file-size limit (ulimit -f) was reached", "raise the limit and resume with --resume auto"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission" in text or "read-only" in text:
        cause, fix = "the folder is not writable", "make it writable or use another --results-dir, then --resume auto"
    else:
        cause, fix = f"{type(e).__name__}: {' '.join(str(e).split())[:100]}", "fix the folder and resume with --resume auto"
    return (f"could not write checkpoint {path.name} in {path.parent}: {cause}; {fix} "
            "(the checkpoints already there are intact)")


def remove_stale_temp_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Temp files of saves interrupted by a kill (.step_*.pt.*.tmp); call only while holding the run lock."""
    d = Path(ckpt_dir)
    stale = [p for p in d.glob(".step_*.pt.*.tmp")] if d.is_dir() else []
    for p in stale:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:  # a read-only folder: the next save reports it in one line
            raise CheckpointWriteError(f"cannot remove the stale temp file {p} ({e.strerror}): the checkpoints folder "
                                       f"{d} is not writable; make it writable or use another --results-dir") from None
    return stale


class RunLock:
    """One training run per results folder: RESULTS/.lock holds the pid, process start time, boot and host of the
    run that owns it.

    The lock appears complete or not at all: it is written to a temp file and hard-linked into place (link fails
    if the lock exists, atomically, also on NFS). A second run stops with a one-line error naming the first. A lock
    whose process is gone, or whose pid now belongs to a younger process (pid reuse) or to an earlier boot, is
    stale and taken over with a warning; same-host takeovers are serialised by an flock on RESULTS/.lock.guard,
    so two runs can never both replace a stale lock. On another host the lock cannot be checked: the error says
    how to remove it."""

    def __init__(self, results_dir: str | os.PathLike):
        self.path = Path(results_dir) / ".lock"
        self.held = False
        self.me: dict | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import socket
        import time
        import warnings

        me = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(), "start": _start_time(os.getpid()),
              "pidns": _pid_namespace(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(f".lock.{me['pid']}.{os.urandom(4).hex()}.tmp")
        tmp.write_text(json.dumps(me))
        guard = os.open(self.path.with_name(".lock.guard"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # same-host contenders check and replace one at a time
            for _ in range(3):
                try:
                    _place(tmp, self.path)
                except FileExistsError:
                    other = _read_lock(self.path)
                    if other is None:
                        continue  # removed meanwhile (its run ended): try again
                    if not other:
                        raise ValueError(f"{self.path} is unreadable (damaged, or not written by switch-dit); delete it "
                                         f"if no run uses {self.path.parent}")
                    pid, host = other.get("pid"), other.get("host")
                    # same host and same pid namespace (containers sharing a hostname see other pids): checkable
                    if host == me["host"] and other.get("pidns") in (None, me["pidns"]) and _stale(other):
                        why = "that process is gone" if not (isinstance(pid, int) and _alive(pid)) else \
                            "its pid now belongs to another process"
                        warnings.warn(f"{self.path}: taking over the lock of run pid {pid} ({why})", stacklevel=2)
                        self.path.unlink(missing_ok=True)
                        continue
                    where = f"pid {pid} on {host}" + (f", started {other['started']}" if other.get("started") else "")
                    raise ValueError(f"results dir {self.path.parent} is in use by another training run ({where}); "
                                     f"wait for it or stop it, or choose another --results-dir"
                                     + ("" if host == me["host"] and other.get("pidns") in (None, me["pidns"])
                                        else f" (it cannot be checked from here: if no run is alive there, delete "
                                             f"{self.path})"))
                self.held, self.me = True, me
                return self
            raise ValueError(f"could not take the lock {self.path}; delete it if no run uses {self.path.parent}")
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            if (_read_lock(self.path) or {}).get("pid") == os.getpid():  # never remove a lock taken over from us
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _place(tmp: Path, path: Path) -> None:
    """Put the complete lock file at path, failing with FileExistsError if one is there: a hard link (atomic,
    NFS too); where the file system has no hard links, an exclusive create and write (the guard flock covers
    same-host racers)."""
    import errno
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK):
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _read_lock(path: Path) -> dict | None:
    import json
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as a lock of an unknown run (never deleted on a guess)
    return data if isinstance(data, dict) else {}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _stale(other: dict) -> bool:
    """A lock of this host whose run cannot be alive: another boot, no such process, or the pid reused."""
    pid = other.get("pid")
    if not isinstance(pid, int) or not other:
        return False  # unknown content: not ours to delete
    if other.get("boot") and _boot_id() and other["boot"] != _boot_id():
        return True
    if not _alive(pid):
        return True
    start = other.get("start")
    return isinstance(start, int) and _start_time(pid) not in (None, start)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(ckpt_dir: str | os.PathLike, keep_last: int, keep: set[int] | None = None) -> None:
    """Keep the newest keep_last checkpoints, and the steps in ``keep`` (the last one known to train well)."""
    for p in list_checkpoints(ckpt_dir)[:-keep_last]:
        if keep and int(_NAME.match(p.name).group(1)) in keep:
            continue
        p.unlink(missing_ok=True)


def last_good_step(health: dict[int, float], factor: float = 10.0, best: float | None = None,
                   run_factor: float = 3.0) -> int | None:
    """The newest checkpoint step whose weights trained well: ``health`` maps a checkpoint step to the loss
    measured with its weights (the next step's loss); good = finite, at most ``factor`` times the lowest such loss
    of the checkpoints up to it, and, given the run's best smoothed training loss ``best`` (recorded in every
    checkpoint, so it survives resumes and pruning), at most ``run_factor`` times that: a checkpoint saved after
    the loss had already exploded is never advice, even when every kept checkpoint is as bad."""
    import math

    lowest, good = math.inf, None
    for step in sorted(health):
        loss = health[step]
        if not math.isfinite(loss):
            continue
        lowest = min(lowest, loss)
        if loss <= factor * lowest and (best is None or not math.isfinite(best) or loss <= run_factor * best):
            good = step
    return good


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
    import warnings

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give a file such as "
                              "RUN/checkpoints/step_XXXXXXX.pt" if path.is_dir() else f"checkpoint {path} does not exist")
    with warnings.catch_warnings():  # torch's notes on odd pickle protocols: the outcome below says what matters
        warnings.simplefilter("ignore")
        return _load(path)


def _load(path: Path) -> dict:
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


class CorruptCheckpointError(CheckpointError):
    """A file that is not a readable PyTorch checkpoint (truncated, damaged, or another kind of file); ``problem``
    is what is wrong without the advice, for callers that know better advice."""

    def __init__(self, problem: str, advice: str | None = None):  # (advice optional: exceptions unpickle with args)
        super().__init__(problem if advice is None else f"{problem}; {advice}")
        self.problem = problem


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # neither torch.save's zip nor a pickle
        return CorruptCheckpointError(
            f"{path} is not a PyTorch checkpoint (no zip or pickle inside)", "give a training checkpoint "
            "(RUN/checkpoints/step_XXXXXXX.pt), an exported .safetensors or a model folder")
    first = str(e).splitlines()[0] if str(e) else ""
    if len(first) > 120:  # cut at a word, marked as cut
        first = first[:120].rsplit(" ", 1)[0] + " ..."
    return CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first})",
                                  "use an earlier checkpoint or delete this file")


def newest_readable(paths) -> Path | None:
    """The newest of these checkpoint files that loads (None if none does)."""
    for p in reversed(list(paths)):
        try:
            load(p)
            return Path(p)
        except CheckpointError:
            continue
    return None


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


def export_model(state: dict, out: str | os.PathLike, dtype: torch.dtype = torch.float32, use_ema: bool = True) -> Path:
    """Write a training checkpoint's EMA (or raw) weights as safetensors, with the config, shapes and step in
    the metadata: the safe format to share a trained model (loading it can run no code)."""
    import json

    from safetensors.torch import save_file

    weights = state["ema" if use_ema else "model"]
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    meta = {"format": MODEL_FORMAT, "config": json.dumps(state["config"]), "step": str(state.get("step")),
            "in_channels": str(state["in_channels"]), "input_size": str(state["input_size"]),
            "num_classes": str(state["num_classes"]), "weights": "ema" if use_ema else "model",
            **({"class_names": json.dumps(state["class_names"])} if state.get("class_names") else {})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600
    os.replace(tmp, out)
    return out


def load_exported(path: str | os.PathLike) -> tuple[dict, dict]:
    """(float32 weights, metadata) of an exported model; a file of another kind gives a CheckpointError."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}); export it again "
                              "with 'switch-dit export'") from None
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file without switch-dit metadata; make one with "
                              "'switch-dit export CKPT --out FILE.safetensors'")

    def damaged(what):
        return CheckpointError(f"{path}: its metadata {what}; the file is damaged or edited: export it again with "
                               "'switch-dit export'")

    try:
        config = json.loads(meta["config"])
    except KeyError:
        raise damaged("has no config") from None
    except ValueError:
        raise damaged("config is not valid JSON") from None
    if not isinstance(config, dict):
        raise damaged(f"config is a JSON {type(config).__name__}, not an object")
    sizes = {}
    for key in ("in_channels", "input_size", "num_classes"):
        v = meta.get(key)
        if v is None or not str(v).isdigit() or int(v) < 1:
            raise damaged(f"{key} is {v!r}, not a positive integer")
        sizes[key] = int(v)
    step = meta.get("step")
    if step not in (None, "None") and not str(step).isdigit():
        raise damaged(f"step is {step!r}")
    names = None
    if meta.get("class_names"):
        try:
            names = json.loads(meta["class_names"])
        except ValueError:
            raise damaged("class_names are not valid JSON") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise damaged("class_names are not a list of names")
    meta = {**meta, "config": config, **sizes, "step": None if step in (None, "None") else int(step),
            "class_names": names}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, meta
