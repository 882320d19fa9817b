"""A diffusers-style pipeline: load any model once, then sample chosen classes with one call.

    pipe = switch_dit.Pipeline.from_pretrained("fashion-mnist")
    images = pipe(class_labels=["Sneaker", 3], num_inference_steps=20, guidance_scale=2.5, sampler="dpm++",
                  generator=torch.Generator().manual_seed(0))

Sample i of a call has the seed base * 1000003 + i, base = the generator's seed modulo 2^32 (or ``seed``, or the
model's recorded global seed), exactly as ``switch-dit sample --global-seed base``: a call reproduces the command
line.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .models.dit import DiT


def class_index(model: DiT, label) -> int:
    """A class given by index or by name (case-insensitive) as its index; anything else is a one-line error."""
    names = getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)]
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < model.num_classes:
            raise ValueError(f"class {label} is out of range: this model has classes 0..{model.num_classes - 1}")
        return int(label)
    if isinstance(label, str):
        folded = [n.lower() for n in names]
        if label.strip().lower() in folded:  # names first: folders named "10", "2" sort as strings
            return folded.index(label.strip().lower())
        if label.strip().lstrip("-").isdigit():
            return class_index(model, int(label))
    raise ValueError(f"unknown class {label!r}: give an index 0..{model.num_classes - 1} or one of "
                     f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")


class Pipeline:
    def __init__(self, model: DiT, vae=None, device: str | torch.device | None = None):
        from .utils.dist import resolve_device

        self.model = model.eval()
        self.config = model.config
        self.device = torch.device(device) if device is not None else resolve_device("auto")
        self.model.to(self.device)
        self.vae = vae
        if vae is None and self.config.vae:
            from .data.latents import load_vae
            self.vae = load_vae(self.config.vae)
        if self.vae is not None:
            self.vae.to(self.device)

    @classmethod
    def from_pretrained(cls, path_or_name, vae: str | None = None, ema: bool = True, device=None, **overrides):
        """A shipped model's name, a model folder, a checkpoint or an export (see switch_dit.load); vae: a local
        AutoencoderKL folder for latent models (default: the one the model recorded)."""
        from .loading import load

        model = load(path_or_name, ema=ema, **overrides)
        if vae is not None:
            from .data.latents import load_vae
            model.config.vae = vae
            return cls(model, load_vae(vae), device)
        return cls(model, None, device)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def class_index(self, label) -> int:
        return class_index(self.model, label)

    def __call__(self, class_labels=None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil", batch_size: int = 32):
        """Images for class_labels (indices or names; default: one of each class), as PIL images
        (output_type='pil') or one uint8 (N, H, W, C) array ('np'). Unset options are the model's defaults."""
        from .config import SAMPLERS
        from .sample import sample_batched

        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        cfg = dataclasses.replace(self.config)
        if sampler is not None:
            if sampler not in SAMPLERS[cfg.objective]:
                raise ValueError(f"sampler {sampler!r} does not apply to this {cfg.objective} model: use one of "
                                 f"{', '.join(SAMPLERS[cfg.objective])}")
            cfg.sampler = sampler
        if num_inference_steps is not None:
            cfg.num_sampling_steps = num_inference_steps
        if guidance_scale is not None:
            cfg.cfg_scale = guidance_scale
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (or use seed=N), got {type(generator).__name__}")
        if generator is not None and seed is not None:
            raise ValueError("give generator or seed, not both (each sets the samples' seeds)")
        if generator is not None:  # its seed, modulo 2^32 (an unseeded generator's is larger than seeds go)
            cfg.global_seed = generator.initial_seed() % 2**32
        elif seed is not None:
            cfg.global_seed = seed
        try:
            cfg.validate()
        except ValueError as e:  # in this call's words, not the command line's
            msg = str(e)
            for flag, name in (("--num-sampling-steps", "num_inference_steps"), ("--cfg-scale", "guidance_scale"),
                               ("--global-seed", "seed"), ("--sampler", "sampler")):
                msg = msg.replace(flag, name)
            raise ValueError(msg) from None
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):  # a tensor or array of indices, as a list of them
            arr = np.asarray(class_labels.detach().cpu() if isinstance(class_labels, torch.Tensor) else class_labels)
            if arr.ndim > 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"class_labels as a tensor or array must hold class indices (1-D integers), got "
                                 f"shape {tuple(arr.shape)} of {arr.dtype}")
            class_labels = [int(c) for c in arr.reshape(-1)]
        labels = list(range(self.model.num_classes)) if class_labels is None else [
            self.class_index(c) for c in (class_labels if isinstance(class_labels, (list, tuple)) else [class_labels])]
        images = sample_batched(self.model, cfg, labels, cfg.global_seed, self.device, batch_size, self.vae)
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]

    def routing(self, num_bins: int = 50) -> dict:
        """The model's routing: Switch-DiT's task-expert map (timesteps x expert slots) with its summary, or a
        token-routed model's (blocks, timestep bins, experts) map measured on its training data, with the
        timestep information per block. DiT and DTR have no learned routing (a one-line error)."""
        from . import analysis

        most = 1000 if self.config.objective == "flow" else self.config.diffusion_steps  # (a bin per timestep)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= most:
            raise ValueError(f"num_bins must be a whole number between 1 and {most}, got {num_bins!r}")
        if self.model.prior is not None:
            pattern = analysis.task_expert_map(self.model)
            return {"kind": "timestep", "map": pattern, "summary": analysis.routing_record(self.model, pattern),
                    "binned": analysis.binned_switch_map(self.model, num_bins)}
        if self.model.mixtures:
            frac, summary = analysis.token_routing(self.model, self.config, *analysis.analysis_images(self.config),
                                                   num_bins=num_bins)
            return {"kind": self.model.mixtures[0].kind, "map": frac, "summary": summary}
        raise ValueError(f"{self.config.model} has no learned routing (DiT and DTR); routing maps need Switch-DiT, "
                         "TC-MoE, EC-MoE or DiffMoE")

    def save_pretrained(self, folder, **kwargs):
        from .loading import save_pretrained
        return save_pretrained(self.model, folder, **kwargs)


__all__ = ["Pipeline", "class_index"]
