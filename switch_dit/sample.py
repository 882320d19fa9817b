"""Sampling: PNG grids and ADM-format .npz sets (torchrun-parallel, per-sample seeds, resumable)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .diffusion import create_diffusion
from .diffusion.gaussian import GaussianDiffusion
from .images import make_grid, save_png, to_uint8
from .models.dit import DiT
from .utils import dist as du


# Loading lives in switch_dit.loading; these names stay importable from here.
from .loading import PRETRAINED, PRETRAINED_DIR, resolve_pretrained  # noqa: F401
from .loading import load_model as load_model_for_sampling  # noqa: F401


SAMPLERS = ("ddpm", "ddim", "dpm++")


def sampling_diffusion(cfg: Config) -> GaussianDiffusion:
    """The respaced process a sampler walks: DDIM's stride spacing for ddim, N evenly spread steps (the first
    and last included) for ddpm, and for dpm++ N steps from T-1 down to about T/N, from where its last update
    jumps to clean data (stepping on to t = 0 would make the last second-order step extrapolate across the
    steep end of the log-SNR curve)."""
    spacing = {"ddim": f"ddim{cfg.num_sampling_steps}",
               "dpm++": f"linspace{cfg.num_sampling_steps}"}.get(cfg.sampler, str(cfg.num_sampling_steps))
    try:
        return create_diffusion(spacing, noise_schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma,
                                diffusion_steps=cfg.diffusion_steps)
    except ValueError:  # DDIM stride spacing not exact: fall back to even spacing
        return create_diffusion(str(cfg.num_sampling_steps), noise_schedule=cfg.noise_schedule,
                                learn_sigma=cfg.learn_sigma, diffusion_steps=cfg.diffusion_steps)


def compile_for_sampling(model: DiT, backend: str = "inductor") -> DiT:
    """torch.compile the model's forward for sampling (forward_with_cfg calls it, so guidance is compiled too).

    The forward has no graph break in eval mode (the shared-timestep shortcut is skipped while compiling), so
    each batch size compiles once; state_dict, analysis and the uncompiled methods are untouched."""
    if not getattr(model, "_compiled_for_sampling", False):
        model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
        model._compiled_for_sampling = True
    return model


def check_guidance(model: DiT, cfg_scale: float) -> None:
    """Guidance needs a null class; a negative scale is never meant."""
    if cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be >= 0 (1 = no guidance), got {cfg_scale}")
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob == 0:
        kind = "unconditional (one class)" if model.num_classes == 1 else "trained without label dropout"
        raise ValueError(f"--cfg-scale {cfg_scale} needs a null class, but this model is {kind}: use --cfg-scale 1")


class Guided:
    """A sampler-facing model over the conditional batch only: classifier-free guidance runs the
    conditional and null-class halves in one forward; scale 1 (or no classes) skips the null half."""

    def __init__(self, model: DiT, cfg_scale: float, cfg_channels: int | None = None):
        check_guidance(model, cfg_scale)
        self.model, self.scale, self.channels = model, cfg_scale, cfg_channels

    def __call__(self, x, t, y):
        if self.scale == 1.0:
            return self.model(x, t, y)
        null = torch.full_like(y, self.model.num_classes)
        out = self.model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                          self.scale, self.channels)
        out.sample = out.sample[: len(x)]
        return out


def sample_latents(model: DiT, diffusion: GaussianDiffusion, cfg: Config, labels: torch.Tensor, seeds, device):
    """Samples (N, C, H, W) for the given labels; seeds is one int per sample (per-sample generators)."""
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    C = model.in_channels
    size = model.x_embedder.grid_size * model.patch_size
    noise = torch.stack([torch.randn(C, size, size, generator=g) for g in gens]).to(device)
    fn = Guided(model, cfg.cfg_scale, cfg.cfg_channels)
    kwargs = dict(y=labels.to(device))
    clip = cfg.vae is None and cfg.data != "latents"  # pixel space lives in [-1, 1]
    # Per-step noise comes from the same per-sample CPU generators, so batching never changes a sample.
    if cfg.sampler == "ddim":
        return diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, clip_denoised=clip, model_kwargs=kwargs,
                                          generator=gens, eta=cfg.ddim_eta)
    if cfg.objective == "flow":
        from .flow import FlowMatching
        return FlowMatching().sample(fn, noise, cfg.num_sampling_steps, cfg.sampler, model_kwargs=kwargs,
                                     generator=gens)
    if cfg.sampler == "dpm++":  # deterministic: the per-sample initial noise is all the randomness
        return diffusion.dpm_solver_pp_loop(fn, noise.shape, noise=noise, clip_denoised=clip, model_kwargs=kwargs)
    return diffusion.p_sample_loop(fn, noise.shape, noise=noise, clip_denoised=clip, model_kwargs=kwargs,
                                   generator=gens)


def decode(x: torch.Tensor, vae) -> torch.Tensor:
    if vae is None:
        return x
    from .data.latents import decode_latents
    return decode_latents(vae, x)


def sample_batched(model: DiT, cfg: Config, labels: list[int], seed: int, device, batch_size: int | None = None,
                   vae=None) -> np.ndarray:
    """uint8 (N, H, W, C) images for labels, sample i from the seed seed * 1000003 + i, in forwards of batch_size
    samples (None: one). Batching changes no sample except for the variants whose samples depend on their batch
    (batch-scope EC-MoE, DiffMoE); the command line and Pipeline batch alike for that reason."""
    if not labels:
        raise ValueError("no class labels to sample: give at least one (an index or a class name)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    step = batch_size or len(labels)
    diffusion = sampling_diffusion(cfg)
    out = []
    for s in range(0, len(labels), step):
        idx = range(s, min(len(labels), s + step))
        with torch.no_grad():
            x = sample_latents(model, diffusion, cfg, torch.tensor([labels[i] for i in idx]),
                               [seed * 1_000_003 + i for i in idx], torch.device(device))
            out.append(to_uint8(decode(x, vae)))
    return np.concatenate(out)


def class_grid(model: DiT, cfg: Config, num_classes: int, per_class: int = 8, seed: int = 0, device=None,
               vae=None, batch_size: int | None = None) -> np.ndarray:
    """One row per class (at most 10 rows), per_class samples each, as a uint8 grid (H, W, C); an
    unconditional model (one class) fills per_class rows. batch_size: samples per forward (None: all)."""
    device = device or next(model.parameters()).device
    classes = list(range(min(num_classes, 10))) if num_classes > 1 else [0] * per_class
    labels = [c for c in classes for _ in range(per_class)]
    was_training = model.training
    model.eval()
    try:
        images = sample_batched(model, cfg, labels, seed, device, batch_size, vae)
    finally:
        model.train(was_training)
    return make_grid(images, nrow=per_class)


def sample_images(model: DiT, cfg: Config, num_samples: int, device, vae=None, batch_size: int = 100,
                  seed_base: int | None = None, progress: bool = False) -> np.ndarray:
    """num_samples uint8 (N, H, W, C) images with the classes evenly represented (label i % classes) and the
    per-sample seeds seed_base + i (default: from cfg.global_seed)."""
    seed_base = cfg.global_seed * 1_000_003 if seed_base is None else seed_base
    diffusion = sampling_diffusion(cfg)
    chunks = []
    starts = range(0, num_samples, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"sample ({cfg.sampler}, {cfg.num_sampling_steps} steps)", unit="batch")
    for s in starts:
        idx = range(s, min(num_samples, s + batch_size))
        labels = torch.tensor([i % model.num_classes for i in idx])
        with torch.no_grad():
            x = sample_latents(model, diffusion, cfg, labels, [seed_base + i for i in idx], torch.device(device))
            chunks.append(to_uint8(decode(x, vae)))
    return np.concatenate(chunks)


def write_grid(path: str, grid: np.ndarray, scale: int = 1, row_names: list[str] | None = None) -> str:
    """The grid as PNG, up-scaled; row_names (one per row of tiles) are written in a margin on the left."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if row_names:
        from .images import label_rows
        grid = label_rows(grid, row_names, scale)
        scale = 1
    save_png(grid, path, scale=scale)
    return str(path)


def npz_to_png_folder(npz: str, folder: str) -> str:
    """The samples of an .npz as one PNG file each (000000.png, ...), with the manifest beside them."""
    import json

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(npz) as d:
        images = d["arr_0"]
        manifest = str(d["manifest"]) if "manifest" in d else None
    for i, im in enumerate(images):
        save_png(im, out / f"{i:06d}.png")
    if manifest:
        (out / "manifest.json").write_text(json.dumps(json.loads(manifest), indent=1))
    return str(out)


def sample_npz(model: DiT, cfg: Config, num_samples: int, out_path: str, batch_size: int = 32,
               num_classes: int | None = None, vae=None, progress: bool = True, manifest: dict | None = None,
               overwrite: bool = False) -> str | None:
    """ADM-format .npz (uint8 NHWC under arr_0, labels under arr_1, the manifest as JSON under 'manifest') of
    num_samples samples.

    Sample i has its own seed (global_seed, i) and label, so the set does not depend on the number of
    processes; chunks of batch_size are written to OUT.parts/ as they finish and skipped on a rerun. The parts
    folder records the manifest (provenance.sampling_manifest) of what it samples: a rerun with other settings
    refuses to mix them in (``overwrite`` discards them instead)."""
    import json
    import shutil

    from .provenance import manifest_differences

    info = du.setup(cfg.device)
    device = info.device
    model = model.to(device).eval()
    num_classes = num_classes or model.num_classes
    parts = Path(str(out_path) + ".parts")
    if Path(out_path).is_dir():  # every rank checks what every rank can read, so all stop alike
        raise ValueError(f"--out {out_path} is a folder; give the .npz file to write")
    if overwrite and info.is_main and parts.exists():
        shutil.rmtree(parts)
    du.barrier()
    saved = parts / "manifest.json"
    if manifest is not None and parts.is_dir() and any(parts.glob("[0-9]*.npz")):
        old = json.loads(saved.read_text()) if saved.is_file() else None
        diffs = ["no manifest (written by an earlier version)"] if old is None else manifest_differences(old, manifest)
        if diffs:
            raise ValueError(f"{parts} holds samples drawn with other settings ({'; '.join(diffs)}): pass "
                             "--overwrite to discard them, or choose another --out")
    if info.is_main:
        parts.mkdir(parents=True, exist_ok=True)
        if manifest is not None:  # atomically: the other processes may be reading it for their own check
            tmp = parts / ".manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, saved)
    du.barrier()
    diffusion = sampling_diffusion(cfg)
    chunks = list(range(0, num_samples, batch_size))
    mine = [c for k, c in enumerate(chunks) if k % info.world_size == info.rank]
    todo = [c for c in mine if not (parts / f"{c:09d}.npz").exists()]
    it = todo
    if progress and info.is_main:
        from tqdm.auto import tqdm
        it = tqdm(todo, desc="sample")
    for start in it:
        idx = np.arange(start, min(start + batch_size, num_samples))
        seeds = [cfg.global_seed * 1_000_003 + int(i) for i in idx]
        labels = torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(s + 7)))
                               for s in seeds])
        with torch.no_grad():
            x = sample_latents(model, diffusion, cfg, labels, seeds, device)
            images = to_uint8(decode(x, vae))
        tmp = parts / f".{start:09d}.tmp.npz"
        np.savez(tmp, images=images, labels=labels.numpy(), index=idx)
        os.replace(tmp, parts / f"{start:09d}.npz")
    du.barrier()
    if not info.is_main:
        du.teardown()
        return None
    files = sorted(parts.glob("[0-9]*.npz"))
    images, labels, index = [], [], []
    for f in files:
        with np.load(f) as d:
            images.append(d["images"])
            labels.append(d["labels"])
            index.append(d["index"])
    index = np.concatenate(index)
    order = np.argsort(index)
    if not np.array_equal(index[order], np.arange(num_samples)):
        raise RuntimeError(f"sample parts in {parts} do not cover 0..{num_samples - 1} exactly; delete the folder and rerun")
    images = np.concatenate(images)[order]
    labels = np.concatenate(labels)[order]
    if images.shape[-1] == 1:  # the ADM evaluator reads (N, H, W, 3): grey repeated
        images = np.repeat(images, 3, axis=-1)
    tmp = str(out_path) + ".tmp.npz"
    extra = {"manifest": np.array(json.dumps(manifest))} if manifest is not None else {}
    np.savez(tmp, arr_0=images, arr_1=labels, **extra)
    os.replace(tmp, out_path)
    du.teardown()
    return str(out_path)
