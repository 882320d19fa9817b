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
    """Write task_expert_map.png (labelled, beside the matched prior), task_affinity.png, prior_affinity.png and
    routing.json; return the summary."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = task_expert_map(model)
    save_figure(routing_figure(model), out / "task_expert_map.png")
    save_figure(affinity_figure(task_affinity(pattern), "task-task affinity of the learned routing"),
                out / "task_affinity.png")
    prior = model.prior.table.cpu().numpy()
    save_figure(affinity_figure(task_affinity(prior), "task-task affinity of the diffusion prior"),
                out / "prior_affinity.png")
    summary = routing_record(model, pattern)
    summary["files"] = {k: str(out / f"{k}.png") for k in ("task_expert_map", "task_affinity", "prior_affinity")}
    (out / "routing.json").write_text(json.dumps(summary, indent=1))
    return summary


# --- token-routed mixtures (TC-MoE, EC-MoE, DiffMoE): which experts a timestep's tokens reach -----------------

def _noised(cfg, x0: torch.Tensor, bins: torch.Tensor, num_bins: int, noise: torch.Tensor):
    """x_t and the model's time input for each sample's timestep bin (the bin's centre)."""
    centre = (bins.double() + 0.5) / num_bins  # in (0, 1): 0 = data, 1 = noise
    if cfg.objective == "flow":
        t = centre.float()
        xt = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
        return xt, 1000.0 * t
    from .diffusion import create_diffusion

    d = create_diffusion(noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps)
    t = (centre * d.num_timesteps).floor().long().clamp(0, d.num_timesteps - 1)
    a = torch.from_numpy(d.sqrt_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    s = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    return a * x0 + s * noise, t


@torch.no_grad()
def token_expert_counts(model: DiT, cfg, images: torch.Tensor, labels: torch.Tensor, num_bins: int = 50,
                        rounds: int = 16, seed: int = 0) -> np.ndarray:
    """(rounds, bins, blocks, E): for each noised sample, the number of its tokens each expert processes, measured
    on real images noised to every bin. Each forward is a batch with one sample per bin (mixed timesteps, as in
    training with uniform t), so expert choice over the batch sees a pool like its training pool; eval mode (token
    choice: dropless). A token reaches top-k experts (token choice) or 0 to E, on average the capacity factor
    (expert choice)."""
    mixtures = model.mixtures
    if not mixtures:
        raise ValueError("this model has no token-routed experts (TC-MoE, EC-MoE or DiffMoE)")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    per_sample = model.x_embedder.num_patches
    counts = np.zeros((rounds, num_bins, len(mixtures), mixtures[0].num_experts))
    bins = torch.arange(num_bins)
    was_training = model.training
    model.eval()
    for m in mixtures:
        m.record = True
    try:
        for r in range(rounds):
            pick = torch.randint(0, len(images), (num_bins,), generator=g)
            noise = torch.randn(images[pick].shape, generator=g)
            xt, t = _noised(cfg, images[pick].float(), bins, num_bins, noise)
            model(xt.to(device), t.to(device), labels[pick].to(device))
            for i, m in enumerate(mixtures):
                counts[r, :, i] = m.last_assign.double().cpu().view(num_bins, per_sample, -1).sum(1).numpy()
    finally:
        for m in mixtures:
            m.record, m.last_assign = False, None
        model.train(was_training)
    return counts


def token_expert_map(model: DiT, cfg, images: torch.Tensor, labels: torch.Tensor, num_bins: int = 50,
                     rounds: int = 16, seed: int = 0) -> np.ndarray:
    """(blocks, bins, E): the fraction of a timestep bin's tokens that each expert processes (token_expert_counts
    summed over its samples). With the defaults each bin holds 16 samples' tokens (256 at 16 tokens a sample)."""
    return _fractions(token_expert_counts(model, cfg, images, labels, num_bins, rounds, seed),
                       model.x_embedder.num_patches)


def _fractions(counts: np.ndarray, tokens_per_sample: int) -> np.ndarray:
    """token_expert_counts' (rounds, bins, blocks, E) -> (blocks, bins, E) fractions of each bin's tokens."""
    return (counts.sum(0) / (counts.shape[0] * tokens_per_sample)).transpose(1, 0, 2)


def routing_information(frac: np.ndarray) -> float:
    """Mutual information (bits) between the timestep bin and the expert a routed token slot reaches, for one
    block's (bins, E) map of fractions: 0 when the experts' shares are the same at every timestep; at most
    log2(E). Bins weigh by their routed slots (equal for token choice and Switch-DiT, whose tokens all get k
    experts; expert choice may give some timesteps more experts per token, which ``routed_experts_per_token``
    records: this information is about which experts, not how many). Measured on finite samples it is biased
    upwards: ``permutation_null`` estimates by how much."""
    joint = frac / max(float(frac.sum()), 1e-300)
    p_bin = joint.sum(1, keepdims=True)
    p_exp = joint.sum(0, keepdims=True)
    nz = joint > 0
    return max(0.0, float((joint[nz] * np.log2(joint[nz] / (p_bin @ p_exp)[nz])).sum()))


def permutation_null(counts: np.ndarray, permutations: int = 50, seed: int = 0) -> np.ndarray:
    """(blocks,): the mean ``routing_information`` of token_expert_counts' samples with their timestep bins
    shuffled among them (each sample's tokens moved together, so the correlation of one image's tokens is kept):
    what a map without any timestep dependence measures on a sample of this size (its upward bias)."""
    R, B, N, E = counts.shape
    flat = counts.reshape(R * B, N, E)
    bins = np.tile(np.arange(B), R)
    rng = np.random.default_rng(seed)
    total = np.zeros(N)
    for _ in range(permutations):
        onehot = np.eye(B)[rng.permutation(bins)]  # (samples, bins)
        frac = np.einsum("sb,sne->nbe", onehot, flat)
        total += [routing_information(f) for f in frac]
    return total / permutations


def binned_switch_map(model: DiT, num_bins: int = 50) -> np.ndarray:
    """Switch-DiT's task-expert map in the token maps' format: (blocks, bins, M), the fraction of each bin's
    timesteps whose gate selects each expert (its tokens all follow the timestep)."""
    return binned_pattern(task_expert_map(model), model.switch_routers[0].num_experts, num_bins)


def pattern_from_summary(summary: dict, top_k: int) -> np.ndarray | None:
    """Switch-DiT's (T, N*M) task-expert map rebuilt from a routing summary (``routing_summary``), where that is
    exact: every block keeps top_k - 1 shared experts and switches its remaining one at most once, so the
    experts' usage says which serves before and which after the switch. None where it is not exact."""
    T, M = summary["num_timesteps"], summary["num_experts"]
    cols = []
    for b in summary["blocks"]:
        shared, switches, usage = b["shared_experts"], b["switch_timesteps"], b["usage"]
        if len(shared) != top_k - 1 or len(switches) > 1:
            return None
        block = np.zeros((T, M))
        block[:, shared] = 1
        rest = [j for j in range(M) if j not in shared and usage[j] > 0]
        if not switches:
            if len(rest) != 1:
                return None
            block[:, rest[0]] = 1
        else:
            t = switches[0]
            low = [j for j in rest if abs(usage[j] - t / T) < 0.5 / T]
            high = [j for j in rest if abs(usage[j] - (T - t) / T) < 0.5 / T and j not in low]
            if len(low) != 1 or len(high) != 1:
                return None
            block[:t, low[0]] = 1
            block[t:, high[0]] = 1
        cols.append(block)
    return np.concatenate(cols, axis=1)


def binned_pattern(pattern: np.ndarray, num_experts: int, num_bins: int = 50) -> np.ndarray:
    """A (T, N*M) task-expert map as (blocks, bins, M): the fraction of each bin's timesteps selecting each expert."""
    T, NM = pattern.shape
    edges = np.linspace(0, T, num_bins + 1).round().astype(int)
    binned = np.stack([pattern[a:b].mean(0) for a, b in zip(edges[:-1], edges[1:])])
    return binned.reshape(num_bins, NM // num_experts, num_experts).transpose(1, 0, 2)


def token_routing_record(frac: np.ndarray, kind: str, null: np.ndarray | None = None) -> dict:
    """JSON-able summary of a (blocks, bins, E) routing map: per block the experts' share of the routed slots
    (load balance: max share / mean share, 1 = balanced), the routed experts a token gets at each timestep bin,
    the timestep information, its permutation null where the map was measured on samples (None for Switch-DiT's
    exact map), and the map itself."""
    blocks = []
    for b, f in enumerate(frac):
        share = f.sum(0) / max(f.sum(), 1e-12)
        rec = {"block": b, "expert_share": [round(float(s), 4) for s in share],
               "max_over_mean_load": float(share.max() * len(share)),
               "routed_experts_per_token": [round(float(v), 4) for v in f.sum(1)],
               "timestep_information_bits": routing_information(f), "map": np.round(f, 4).tolist()}
        if null is not None:
            rec["null_information_bits"] = float(null[b])
        blocks.append(rec)
    info = [b["timestep_information_bits"] for b in blocks]
    out = {"kind": kind, "num_blocks": len(blocks), "num_experts": int(frac.shape[2]), "num_bins": int(frac.shape[1]),
           "max_information_bits": float(np.log2(frac.shape[2])), "mean_timestep_information_bits": float(np.mean(info)),
           "blocks": blocks}
    if null is not None:
        out["mean_null_information_bits"] = float(np.mean(null))
    return out


def token_routing(model: DiT, cfg, images: torch.Tensor, labels: torch.Tensor, num_bins: int = 50,
                  rounds: int = 16, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A token-routed model's (blocks, bins, E) map and its record with the permutation null."""
    counts = token_expert_counts(model, cfg, images, labels, num_bins, rounds, seed)
    frac = _fractions(counts, model.x_embedder.num_patches)
    record = token_routing_record(frac, model.mixtures[0].kind, permutation_null(counts, seed=seed))
    record["measured_on"] = {"data": cfg.data, "data_path": cfg.data_path, "images": int(len(images))}
    return frac, record


def token_routing_figure(frac: np.ndarray, title: str, kind: str, null=None):
    """Per block, a (timestep bin x expert) heat map of the fraction of the bin's tokens each expert processes,
    titled with the timestep information (and its permutation null, where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, B, E = frac.shape
    cols = min(N, 6)
    rows = -(-N // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 1.4, 3.0 * rows + 0.8), squeeze=False, sharey=True,
                             layout="constrained")
    vmax = max(float(frac.max()), 1e-6)
    for i, ax in enumerate(axes.flat):
        if i >= N:
            ax.axis("off")
            continue
        im = ax.imshow(frac[i], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest",
                       extent=(-0.5, E - 0.5, 1.0, 0.0))
        info = routing_information(frac[i])
        extra = "" if null is None else f"\n(null {null[i]:.2f})"
        ax.set_title(f"block {i + 1}\nI(t; expert) = {info:.2f} bit{extra}", fontsize=8)
        ax.set_xticks(range(E))
        ax.set_xticklabels([str(e) for e in range(E)], fontsize=6)
        ax.set_xlabel("expert", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("t (0 = data, 1 = noise)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of the bin's tokens")
    fig.suptitle(f"{title} ({kind}): which experts each timestep's tokens reach", fontsize=10)
    return fig


def analyze_tokens(model: DiT, cfg, images: torch.Tensor, labels: torch.Tensor, out_dir, num_bins: int = 50) -> dict:
    """The token-routed counterpart of ``analyze``: token_expert_map.png and routing.json."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frac, summary = token_routing(model, cfg, images, labels, num_bins)
    kind = model.mixtures[0].kind
    null = [b["null_information_bits"] for b in summary["blocks"]]
    save_figure(token_routing_figure(frac, cfg.model, kind, null), out / "token_expert_map.png")
    summary["files"] = {"token_expert_map": str(out / "token_expert_map.png")}
    (out / "routing.json").write_text(json.dumps(summary, indent=1))
    return summary


def analysis_images(cfg, limit: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of the run's own training data (images or latents) for the token routing maps."""
    from .data import build_dataset

    dataset = build_dataset(cfg.data, cfg.data_path, cfg.image_size)
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    xs, ys = zip(*(dataset[int(i)] for i in idx))
    x, y = torch.stack([torch.as_tensor(v) for v in xs]), torch.tensor(ys)
    if cfg.data == "latents":
        x = dataset.draw(x, torch.zeros(len(x), dtype=torch.long), torch.randn(x[:, 0, 0].shape,
                                                                              generator=torch.Generator().manual_seed(seed)))
    return x, y
