"""Latent diffusion: a diffusers AutoencoderKL from a local folder, latent pre-extraction, cached-latent data.

The cache holds, for every image and both horizontal flips, the posterior mean and std of the VAE encoder
(float16 .npy files, memory-mapped), so every epoch draws a fresh latent z = mean + std * eps.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import DataError, ImageFolderDataset

DEFAULT_SCALE = 0.18215


def load_vae(path: str | os.PathLike):
    """AutoencoderKL from a local folder (config.json + diffusion_pytorch_model.safetensors); never downloads."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"--vae {path}: no config.json there; point it at a local AutoencoderKL folder "
                        "(e.g. a copy of stabilityai/sd-vae-ft-ema made with diffusers' save_pretrained)")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DataError("latent diffusion needs diffusers: pip install 'switch-dit[latent]'") from e
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    return vae.eval().requires_grad_(False)


def vae_scale(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    p = next(vae.parameters())
    return vae.decode((z / vae_scale(vae)).to(p.device, p.dtype)).sample.float()


def extract_latents(data_path, out, vae_path, image_size: int = 256, batch_size: int = 32, device: str = "auto",
                    skip_corrupt: bool = False):
    """Encode an image folder (both flips) into OUT/{mean,std}.npy (N, 2, C, h, w) float16 and labels.npy.

    torchrun-parallel (each process encodes its share of batches into the shared memory-mapped files) and
    resumable: finished batches are recorded in OUT/done/ and skipped on a rerun."""
    from ..utils import dist as du

    info = du.setup(device)
    try:
        dataset = ImageFolderDataset(data_path, image_size, skip_corrupt)
        vae = load_vae(vae_path).to(info.device)
        out = Path(out)
        n = len(dataset)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % factor:
            raise DataError(f"--image-size {image_size} is not divisible by the VAE's downsampling factor {factor}")
        shape = (n, 2, vae.config.latent_channels, image_size // factor, image_size // factor)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "done").mkdir(exist_ok=True)
            meta = {"num_items": n, "shape": list(shape[2:]), "scale_factor": vae_scale(vae),
                    "vae": str(Path(vae_path).resolve()), "image_size": image_size, "num_classes": dataset.num_classes,
                    "class_names": dataset.class_names, "source": str(Path(data_path).resolve())}
            old = out / "meta.json"
            prev = json.loads(old.read_text()) if old.exists() else None
            if prev is not None and prev.get("vae") != meta["vae"]:
                prev["vae"] = str(Path(prev["vae"]).resolve())  # written relative by earlier versions
            if prev is not None and any(prev[k] != meta[k] for k in prev if k in meta):
                raise DataError(f"{out} holds latents of other inputs; choose another --out or delete it")
            for name in ("mean", "std"):
                if not (out / f"{name}.npy").exists():
                    np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape).flush()
            if not (out / "labels.npy").exists():
                np.save(out / "labels.npy", np.array([c for _, c in dataset.files], dtype=np.int64))
            old.write_text(json.dumps(meta, indent=1))
        du.barrier()
        means = np.load(out / "mean.npy", mmap_mode="r+")
        stds = np.load(out / "std.npy", mmap_mode="r+")
        starts = [s for k, s in enumerate(range(0, n, batch_size)) if k % info.world_size == info.rank]
        for s in starts:
            marker = out / "done" / f"{s:09d}"
            if marker.exists():
                continue
            x = torch.stack([dataset[i][0] for i in range(s, min(n, s + batch_size))]).to(info.device)
            with torch.no_grad():
                for f, imgs in enumerate((x, x.flip(-1))):
                    dist = vae.encode(imgs.to(next(vae.parameters()).dtype)).latent_dist
                    means[s: s + len(x), f] = dist.mean.float().cpu().numpy().astype(np.float16)
                    stds[s: s + len(x), f] = dist.std.float().cpu().numpy().astype(np.float16)
            means.flush()
            stds.flush()
            marker.touch()
        du.barrier()
        return str(out) if info.is_main else None
    finally:
        du.teardown()


class LatentDataset(Dataset):
    """Cached latents: item i is (stacked (2 flips, 2 [mean, std], C, h, w) float tensor, label)."""

    def __init__(self, root):
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise DataError(f"{root} is not a latent cache (no meta.json); make one with 'switch-dit extract-latents'")
        redo = "; make the cache again with 'switch-dit extract-latents'"
        try:
            self.meta = json.loads((root / "meta.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{root / 'meta.json'} is unreadable ({' '.join(str(e).split())}){redo}") from None
        meta = self.meta
        kinds = {"shape": list, "scale_factor": (int, float), "num_classes": int, "class_names": list}
        wrong = [k for k, t in kinds.items() if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), t)] \
            if isinstance(meta, dict) else ["(not a JSON object)"]
        if not wrong and not (len(meta["shape"]) == 3 and all(isinstance(v, int) and v > 0 for v in meta["shape"])
                              and meta["shape"][1] == meta["shape"][2]):
            wrong = ["shape (C, h, w) with h = w"]
        if not wrong and not (math.isfinite(meta["scale_factor"]) and meta["scale_factor"] > 0):
            wrong = ["scale_factor > 0"]
        if not wrong and not (meta["num_classes"] >= 1 and len(meta["class_names"]) == meta["num_classes"]):
            wrong = [f"class_names ({len(meta['class_names'])}) for num_classes {meta['num_classes']}"]
        if wrong:
            raise DataError(f"{root / 'meta.json'} lacks or misstates {', '.join(wrong)}{redo}")
        arrays = {}
        for name in ("mean", "std", "labels"):
            try:
                arrays[name] = np.load(root / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{root / (name + '.npy')} is missing or unreadable "
                                f"({' '.join(str(e).split())}){redo}") from None
        self.means, self.stds = arrays["mean"], arrays["std"]
        expect = (2, *meta["shape"])  # (both flips, C, h, w) per item
        for name in ("mean", "std"):
            a = arrays[name]
            if a.ndim != 5 or a.shape[1:] != expect or a.shape[0] != len(arrays["labels"]):
                raise DataError(f"{root / (name + '.npy')} has shape {a.shape}, not (N, {', '.join(map(str, expect))}) "
                                f"with N = the {len(arrays['labels'])} labels of labels.npy{redo}")
        labels = np.asarray(arrays["labels"])
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or (
                len(labels) and (labels.min() < 0 or labels.max() >= meta["num_classes"])):
            raise DataError(f"{root / 'labels.npy'} must hold integer labels in [0, {meta['num_classes']}) "
                            f"(num_classes in meta.json){redo}")
        self.labels = labels
        self.num_classes = meta["num_classes"]
        self.class_names = meta["class_names"]
        self.scale_factor = meta["scale_factor"]

    def __len__(self):
        return len(self.labels)

    @property
    def shape(self):
        return tuple(self.meta["shape"])

    def __getitem__(self, i):  # an unfinished row of the cache is all zeros: say so instead of training on it
        std = np.asarray(self.stds[i], dtype=np.float32)
        if not std.any():
            raise DataError(f"latent {i} was never extracted; rerun 'switch-dit extract-latents' to finish the cache")
        x = np.stack([np.asarray(self.means[i], dtype=np.float32), std], axis=1)
        if not np.isfinite(x).all():  # (it would train as a divergence, with advice about the learning rate)
            raise DataError(f"latent {i} of the cache holds NaN or inf values; rerun 'switch-dit extract-latents' "
                            "into a new folder")
        return torch.from_numpy(x), int(self.labels[i])

    def draw(self, x: torch.Tensor, flips: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A fresh latent per item: the chosen flip's mean + std * eps, times the VAE scale factor."""
        pick = x[torch.arange(len(x)), flips.long()]  # (B, 2, C, h, w)
        return (pick[:, 0] + pick[:, 1] * eps) * self.scale_factor
