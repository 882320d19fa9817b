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


def matched_prior_table(model: DiT, pattern: np.ndarray) -> np.ndarray:
    """The prior table with its columns matched to the learned slots (what the prior loss pulls each slot
    towards); ties broken by a fixed generator, so the model's own tie-breaking state is left alone."""
    from .models.prior import hamming_cost, match_columns

    table = model.prior.table.cpu()
    cost = hamming_cost(torch.from_numpy(pattern).float(), table)
    perm = match_columns(cost.numpy().astype(np.float64), torch.Generator().manual_seed(0))
    return table[:, torch.from_numpy(perm)].numpy()


def routing_figure(model: DiT, title: str = "Task-expert map"):
    """A labelled matplotlib figure as the paper's Fig. 5: rows are timesteps (0 = least noise), columns the
    expert slots grouped by block; the learned map beside the prior matched to it; a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    learned = task_expert_map(model)
    prior = matched_prior_table(model, learned)
    T, NM = learned.shape
    M = model.switch_routers[0].num_experts
    N = NM // M
    cmap = ListedColormap(["#f4f4f4", "#1f4e9c"])
    fig, axes = plt.subplots(1, 2, figsize=(min(16, 3 + 0.16 * NM * 2), 5), sharey=True)
    for ax, m, name in zip(axes, (learned, prior), ("learned: experts chosen by the gates",
                                                    "diffusion prior, matched to the learned slots")):
        ax.imshow(m, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest",
                  extent=(-0.5, NM - 0.5, T - 0.5, -0.5))
        for b in range(1, N):
            ax.axvline(b * M - 0.5, color="#d62728", lw=0.7)
        every = max(1, N // 12)
        ax.set_xticks([b * M + (M - 1) / 2 for b in range(0, N, every)])
        ax.set_xticklabels([str(b + 1) for b in range(0, N, every)])
        ax.set_xlabel(f"block (1 = first), {M} expert slots each")
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel("timestep t (0 = least noise, top)")
    fig.legend(handles=[Patch(color="#1f4e9c", label="expert selected (top-k)"),
                        Patch(facecolor="#f4f4f4", edgecolor="#999999", label="not selected"),
                        Patch(color="#d62728", label="block boundary")],
               loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"{title}: {N} blocks x {M} experts, top-{model.switch_routers[0].top_k}")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


def affinity_figure(affinity: np.ndarray, title: str):
    """Task-task affinity heat map with timestep axes and a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = affinity.shape[0]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(affinity, cmap="viridis", vmin=0, vmax=1, extent=(-0.5, T - 0.5, T - 0.5, -0.5))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="shared experts (min-max normalised)")
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """uint8 (H, W, 3) rendering of a matplotlib figure (for TensorBoard), closing it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_affinity(pattern: np.ndarray) -> np.ndarray:
    """S = W W^T (T x T), min-max normalised to [0, 1]: how many experts two tasks share."""
    s = pattern.astype(np.float64) @ pattern.astype(np.float64).T
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


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


def routing_record(model: DiT, pattern: np.ndarray | None = None) -> dict:
    """routing_summary of the learned map (task_expert_map(model) unless given) plus how closely it follows the
    diffusion prior (the fraction of (timestep, slot) entries equal to the prior table matched to the learned
    slots): a compact, JSON-able description of one trained model's routing, for comparing runs."""
    pattern = task_expert_map(model) if pattern is None else pattern
    summary = routing_summary(pattern, model.switch_routers[0].num_experts)
    summary["prior_agreement"] = float((pattern == matched_prior_table(model, pattern)).mean())
    return summary


def analyze(model: DiT, out_dir) -> dict:
    """Write task_expert_map.png (labelled; _raw: one pixel row per timestep), task_affinity.png (+ the
    prior's) and routing.json; return the summary."""
    import json
    from pathlib import Path

    from .images import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = task_expert_map(model)
    save_figure(routing_figure(model), out / "task_expert_map.png")
    save_png(routing_map_image(model), out / "task_expert_map_raw.png")  # one pixel row per timestep
    save_figure(affinity_figure(task_affinity(pattern), "task-task affinity of the learned routing"),
                out / "task_affinity.png")
    prior = model.prior.table.cpu().numpy()
    save_figure(affinity_figure(task_affinity(prior), "task-task affinity of the diffusion prior"),
                out / "prior_affinity.png")
    summary = routing_record(model, pattern)
    summary["files"] = {k: str(out / f"{k}.png") for k in ("task_expert_map", "task_affinity", "prior_affinity")}
    (out / "routing.json").write_text(json.dumps(summary, indent=1))
    return summary
