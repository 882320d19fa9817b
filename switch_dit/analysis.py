"""Routing analysis: which experts each timestep selects (the task-expert map) beside the diffusion prior."""
from __future__ import annotations

import numpy as np
import torch

from .models.dit import DiT


@torch.no_grad()
def task_expert_map(model: DiT) -> np.ndarray:
    """(T, N*M) binary map: 1 where block n's gate selects expert m at timestep t (block-major columns)."""
    if model.prior is None or not model.switch_routers:
        raise ValueError("this model has no Switch-DiT routing; task-expert maps need a Switch-DiT checkpoint")
    param = next(model.parameters())
    t_all = torch.arange(model.num_timesteps, device=param.device)
    logits = model.all_gate_logits(model.t_embedder(t_all))
    return model.prior.learned_pattern(logits).cpu().numpy()


def routing_map_image(model: DiT, col_width: int = 8, gap: int = 16) -> np.ndarray:
    """uint8 (T, W) picture: the learned map (left) and the prior table (right), white = selected."""
    learned = task_expert_map(model)
    prior = model.prior.table.cpu().numpy()

    def panel(m):
        return np.repeat(m, col_width, axis=1)

    sep = np.full((learned.shape[0], gap), 0.5)
    img = np.concatenate([panel(learned), sep, panel(prior)], axis=1)
    # thin grey lines between blocks make the block structure readable
    M = model.switch_routers[0].num_experts
    for part, offset in ((learned, 0), (prior, learned.shape[1] * col_width + gap)):
        for b in range(1, part.shape[1] // M):
            img[:, offset + b * M * col_width] = 0.35
    return (img * 255).round().astype(np.uint8)


def task_affinity(pattern: np.ndarray) -> np.ndarray:
    """S = W W^T (T x T), min-max normalised to [0, 1]: how many experts two tasks share."""
    s = pattern.astype(np.float64) @ pattern.astype(np.float64).T
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


# A few anchor colours of the viridis map; enough for heat maps without matplotlib.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 RGB through a piecewise-linear viridis."""
    v = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(v.astype(int), len(_VIRIDIS) - 2)
    f = (v - i)[..., None]
    return ((1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1]).round().astype(np.uint8)


def routing_summary(pattern: np.ndarray, num_experts: int) -> dict:
    """Per block: experts chosen at every timestep (shared), never chosen, and where the choice switches."""
    T, NM = pattern.shape
    blocks = []
    for b in range(NM // num_experts):
        cols = pattern[:, b * num_experts: (b + 1) * num_experts].astype(bool)
        changes = [int(t) for t in range(1, T) if not np.array_equal(cols[t], cols[t - 1])]
        blocks.append({
            "block": b,
            "shared_experts": [int(j) for j in np.flatnonzero(cols.all(0))],
            "unused_experts": [int(j) for j in np.flatnonzero(~cols.any(0))],
            "switch_timesteps": changes,
            "usage": [float(u) for u in cols.mean(0)],
        })
    return {"num_timesteps": T, "num_blocks": NM // num_experts, "num_experts": num_experts,
            "blocks_with_a_shared_expert": sum(bool(b["shared_experts"]) for b in blocks), "blocks": blocks}


def analyze(model: DiT, out_dir) -> dict:
    """Write task_expert_map.png, task_affinity.png (+ the prior's) and routing.json; return the summary."""
    import json
    from pathlib import Path

    from .images import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = task_expert_map(model)
    M = model.switch_routers[0].num_experts
    save_png(routing_map_image(model), out / "task_expert_map.png")
    step = max(1, pattern.shape[0] // 500)  # a 1000 x 1000 map is down-sampled to at most 500 px
    save_png(colormap(task_affinity(pattern)[::step, ::step]), out / "task_affinity.png")
    prior = model.prior.table.cpu().numpy()
    save_png(colormap(task_affinity(prior)[::step, ::step]), out / "prior_affinity.png")
    summary = routing_summary(pattern, M)
    summary["files"] = {k: str(out / f"{k}.png") for k in ("task_expert_map", "task_affinity", "prior_affinity")}
    (out / "routing.json").write_text(json.dumps(summary, indent=1))
    return summary
