"""Noise schedules and timestep respacing (ADM / improved DDPM)."""
from __future__ import annotations

import math

import numpy as np


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """'linear' (DiT: 1e-4 .. 0.02, scaled by 1000/T) or 'cosine' (Nichol & Dhariwal, s = 0.008)."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise_schedule {name!r}: choose 'linear' or 'cosine'")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose cumulative product follows alpha_bar(s), s in [0, 1]; clipped at max_beta to avoid singularities."""
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Timesteps kept when respacing. "250" or [250]: 250 evenly spread steps; "10,15,20": per equal section;
    "ddimN": the stride-based DDIM spacing with exactly N steps; "linspaceN": N steps from T-1 down to about T/N
    (DPM-Solver++ then jumps from there to clean data): what diffusers calls 'linspace' spacing, the N + 1 points of
    linspace(0, T - 1, N + 1) rounded, without the 0 (diffusers' 'trailing' ends one timestep lower, at T/N - 1); "" or None: all steps."""
    if section_counts in (None, "", []):
        return list(range(num_timesteps))
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("linspace"):  # N steps ending at T-1, the first at T/N (not at 0)
            n = int(section_counts[len("linspace"):])
            if not 1 <= n <= num_timesteps:
                raise ValueError(f"cannot take {n} linspace steps out of {num_timesteps}")
            return sorted(set(np.round(np.linspace(0, num_timesteps - 1, n + 1)).astype(int)[1:].tolist()))
        if section_counts.startswith("ddim"):
            n = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == n:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {n} DDIM steps with an integer stride out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    base, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps out of a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return kept
