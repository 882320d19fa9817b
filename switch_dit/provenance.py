"""What produced a set of samples or a score: file identities and the settings that determine the samples."""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batch_dependent(model) -> bool:
    """True when a sample depends on the other samples of its batch (expert choice over the batch)."""
    return any(getattr(m, "scope", None) == "batch" for m in getattr(model, "mixtures", []))


def sampling_manifest(model, cfg, model_file: str, use_ema: bool, step, num_samples: int, batch_size: int) -> dict:
    """Everything that determines an .npz sample set (first group) and where it came from (second group)."""
    from . import __version__

    m = {"model_sha256": file_sha256(model_file) if Path(model_file).is_file() else None,
         "ema": bool(use_ema), "step": step, "objective": cfg.objective, "sampler": cfg.sampler,
         "num_sampling_steps": cfg.num_sampling_steps, "cfg_scale": cfg.cfg_scale, "cfg_channels": cfg.cfg_channels,
         "ddim_eta": cfg.ddim_eta if cfg.sampler == "ddim" else None, "noise_schedule": cfg.noise_schedule,
         "diffusion_steps": cfg.diffusion_steps, "learn_sigma": model.learn_sigma,
         "global_seed": cfg.global_seed, "seeds": "global_seed * 1000003 + i",
         "labels": f"uniform over {model.num_classes} classes, seeded per sample", "num_classes": model.num_classes,
         "image_size": model.x_embedder.grid_size * model.patch_size, "in_channels": model.in_channels,
         "vae": cfg.vae, "num_samples": int(num_samples), "batch_size": int(batch_size)}
    known = step is not None  # other code's state dicts (and models saved from them) record no training data
    m["provenance"] = {"model_file": str(Path(model_file).resolve()) if Path(model_file).exists() else str(model_file),
                       "model": cfg.model, "data": cfg.data if known else None,
                       "data_path": cfg.data_path if known else None,
                       "image_size": cfg.image_size, "batch_dependent": batch_dependent(model),
                       "package_version": __version__}
    return m


def manifest_differences(old: dict, new: dict) -> list[str]:
    """'key: old there, new now' for each sample-determining field that differs."""
    keys = [k for k in new if k != "provenance"]
    return [f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in keys if old.get(k) != new[k]]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
