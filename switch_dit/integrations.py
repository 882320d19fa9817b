"""Logging back-ends, isolated here: a plain metrics.jsonl (always), TensorBoard (default), wandb (opt-in, offline)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np


class RunLogger:
    """Logs scalars and images to whichever back-ends are available and asked for; a no-op elsewhere."""

    def __init__(self, log_dir: str, tensorboard: bool = True, wandb: bool = False, config: dict | None = None,
                 enabled: bool = True, start_step: int = 0):
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = _open_jsonl(os.path.join(log_dir, "metrics.jsonl"), start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=os.path.join(log_dir, "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard): no TensorBoard log", stacklevel=2)
        if wandb:
            try:
                import wandb as _wandb
            except ImportError as e:
                raise ValueError("--wandb needs the wandb package: pip install 'switch-dit[wandb]'") from e
            os.environ.setdefault("WANDB_MODE", "offline")  # never requires a network; 'wandb sync' later
            self.wandb = _wandb.init(dir=log_dir, config=config or {})

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if image_hwc.ndim == 2:
            image_hwc = image_hwc[:, :, None]
        if self.tb is not None:
            self.tb.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as _wandb
            self.wandb.log({tag: _wandb.Image(image_hwc)}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _open_jsonl(path: str, start_step: int):
    """Append to metrics.jsonl, first dropping lines past start_step (written after the checkpoint a run resumes
    from), so that a resumed run's log reads as one uninterrupted run."""
    kept = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
    with open(path, "w") as fh:
        fh.writelines(kept)
    return open(path, "a")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (one dict per logged step)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
