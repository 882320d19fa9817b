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
