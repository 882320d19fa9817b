"""Sampling: PNG grids and ADM-format .npz sets (torchrun-parallel, per-sample seeds, resumable)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, config_from_dict
from .diffusion import create_diffusion
from .diffusion.gaussian import GaussianDiffusion
from .factory import build_model
from .images import make_grid, save_png, to_uint8
from .models.dit import DiT
from .utils import dist as du


PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED = {"fashion-mnist": "switch-dit-fashion-mnist.safetensors"}


def resolve_pretrained(path: str) -> str:
    """'pretrained:NAME' (what --pretrained NAME passes) -> the packaged file; other paths unchanged."""
    if not str(path).startswith("pretrained:"):
        return path
    name = str(path).split(":", 1)[1]
    if name not in PRETRAINED:
        raise ValueError(f"--pretrained {name}: no such model; available: {', '.join(PRETRAINED)}")
    file = PRETRAINED_DIR / PRETRAINED[name]
    if not file.is_file():
        raise FileNotFoundError(f"--pretrained {name}: {file} is missing from this installation (it ships as "
                                "package data): reinstall switch-dit from its repository (pip install -e .), or "
                                "train your own with 'switch-dit demo' and pass its checkpoint")
    return str(file)


def load_model_for_sampling(path: str, use_ema: bool = True, cfg_overrides: Config | None = None):
    """(model in eval mode, Config, step) from a switch-dit checkpoint, or from another code's state dict
    (a released DiT-XL-2-256x256.pt, a checkpoint of the authors' Switch-DiT or DTR code), for which
    cfg_overrides supplies --model, --image-size and --top-k."""
    from .models.compat import authors_variant, from_authors_state_dict, strip_wrapper_prefixes
    from .models.dit import parse_model_name

    path = resolve_pretrained(path)
    if str(path).endswith(".safetensors"):  # an exported model (switch-dit export, or --pretrained)
        weights, meta = ckpt.load_exported(path)
        cfg = config_from_dict(meta["config"])
        model = build_model(cfg, meta["in_channels"], meta["input_size"], meta["num_classes"])
        model.load_state_dict(weights)
        return model.eval(), cfg, meta["step"]
    saved = ckpt.load(path)
    if isinstance(saved, dict) and saved.get("format") == ckpt.FORMAT:
        missing = [k for k in ("config", "in_channels", "input_size", "num_classes", "ema", "model") if k not in saved]
        if missing:
            raise ckpt.CheckpointError(f"{path} is a switch-dit checkpoint without {', '.join(missing)}; "
                                       "it is damaged: use another checkpoint")
        cfg = config_from_dict(saved["config"])
        model = build_model(cfg, saved["in_channels"], saved["input_size"], saved["num_classes"])
        model.load_state_dict(saved["ema" if use_ema else "model"])
        return model.eval(), cfg, saved.get("step")
    state = saved.get("ema" if use_ema else "model", saved.get("model", saved)) if isinstance(saved, dict) else None
    if isinstance(state, dict):
        state = strip_wrapper_prefixes(state)
    if not isinstance(state, dict) or "pos_embed" not in state or "x_embedder.proj.weight" not in state:
        raise ckpt.CheckpointError(f"{path} is neither a switch-dit checkpoint nor a DiT state dict")
    cfg = cfg_overrides or Config(model="DiT-XL/2", image_size=256)
    variant = authors_variant(state)
    if variant != "DiT" or parse_model_name(cfg.model)[0] != "DiT":
        if parse_model_name(cfg.model)[0] != variant:
            size = cfg.model.split("-")[-1]
            raise ckpt.CheckpointError(f"{path} holds a {variant} model, not {cfg.model}: pass --model {variant}-{size}")
        if variant == "Switch-DiT":
            cfg.num_experts = state["routers.0.experts.w"].shape[0]
        state = from_authors_state_dict(state)
    w = state["x_embedder.proj.weight"]
    in_channels = w.shape[1]
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    num_classes = 1 if rows == 1 else rows - 1  # one row: unconditional, no null class
    input_size = int(state["pos_embed"].shape[1] ** 0.5) * w.shape[-1]
    model = build_model(cfg, in_channels, input_size, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path} does not fit --model {cfg.model}: {str(e).splitlines()[0]}") from None
    return model.eval(), cfg, None


SAMPLERS = ("ddpm", "ddim", "dpm++")


def sampling_diffusion(cfg: Config) -> GaussianDiffusion:
    """The respaced process a sampler walks: DDIM's stride spacing for ddim, N evenly spread steps (the first
    and last included) for ddpm, and for dpm++ N steps from T-1 down to about T/N, from where its last update
    jumps to clean data (stepping on to t = 0 would make the last second-order step extrapolate across the
    steep end of the log-SNR curve)."""
    spacing = {"ddim": f"ddim{cfg.num_sampling_steps}",
               "dpm++": f"trailing{cfg.num_sampling_steps}"}.get(cfg.sampler, str(cfg.num_sampling_steps))
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


def class_grid(model: DiT, cfg: Config, num_classes: int, per_class: int = 8, seed: int = 0, device=None,
               vae=None) -> np.ndarray:
    """One row per class (at most 10 rows), per_class samples each, as a uint8 grid (H, W, C); an
    unconditional model (one class) fills per_class rows."""
    device = device or next(model.parameters()).device
    classes = list(range(min(num_classes, 10))) if num_classes > 1 else [0] * per_class
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    seeds = [seed * 1_000_003 + i for i in range(len(labels))]
    was_training = model.training
    model.eval()
    x = sample_latents(model, sampling_diffusion(cfg), cfg, labels, seeds, torch.device(device))
    model.train(was_training)
    return make_grid(to_uint8(decode(x, vae)), nrow=per_class)


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


def write_grid(path: str, grid: np.ndarray, scale: int = 1) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, scale=scale)
    return str(path)


def sample_npz(model: DiT, cfg: Config, num_samples: int, out_path: str, batch_size: int = 32,
               num_classes: int | None = None, vae=None, progress: bool = True) -> str | None:
    """ADM-format .npz (uint8 NHWC under arr_0, labels under arr_1) of num_samples samples.

    Sample i has its own seed (global_seed, i) and label, so the set does not depend on the number of
    processes; chunks of batch_size are written to OUT.parts/ as they finish and skipped on a rerun."""
    info = du.setup(cfg.device)
    device = info.device
    model = model.to(device).eval()
    num_classes = num_classes or model.num_classes
    parts = Path(str(out_path) + ".parts")
    if info.is_main:
        parts.mkdir(parents=True, exist_ok=True)
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
    tmp = str(out_path) + ".tmp.npz"
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, out_path)
    du.teardown()
    return str(out_path)
