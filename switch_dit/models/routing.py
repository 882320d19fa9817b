"""The three routing variants of one DiT block.

A router is called as ``router(x, t_index, t_emb)`` and returns the channel mask m that the block
applies (``z * m`` into the branches, ``z * (1 - m)`` skipped to the end), or None for a plain DiT block.
``t_index`` is a LongTensor (N,) of timestep indices, or a Python int when the whole batch shares one
timestep (sampling): routers may then compute one mask row for the batch.

Adding a variant means one class here and one entry in ``ROUTERS``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def dtr_start_positions(num_units: int, num_timesteps: int, active: int, alpha: float) -> np.ndarray:
    """Start of the active window per task: round(((t / (T - 1)) ** alpha) * (C - w)), numpy's half-to-even."""
    last = num_units - active
    return np.round(np.linspace(0.0, 1.0, num_timesteps) ** alpha * last).astype(np.int64)


def dtr_table(num_units: int, num_timesteps: int, active: int, alpha: float) -> torch.Tensor:
    """(T, C) binary table: row t has ones at start_t <= c < start_t + active (DTR, method.md section 4)."""
    if not alpha > 0:  # alpha <= 0 gives windows outside [0, C): rows with fewer than `active` ones
        raise ValueError(f"the DTR window exponent alpha must be > 0, got {alpha}")
    start = dtr_start_positions(num_units, num_timesteps, active, alpha)[:, None]
    c = np.arange(num_units)[None]
    return torch.from_numpy(((c >= start) & (c < start + active)).astype(np.float32))


class DTRRouter(nn.Module):
    """Denoising Task Routing: a fixed binary channel window per timestep, no parameters."""

    def __init__(self, hidden_size: int, num_timesteps: int = 1000, alpha: float = 4.0, beta: float = 0.8):
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"dtr_beta must be in (0, 1], got {beta}")
        if alpha <= 0:
            raise ValueError(f"dtr_alpha must be > 0, got {alpha}")
        self.hidden_size = hidden_size
        self.active = int(np.floor(hidden_size * beta))
        if self.active < 1:
            raise ValueError(f"dtr_beta={beta} leaves no active channel at hidden size {hidden_size}")
        start = dtr_start_positions(hidden_size, num_timesteps, self.active, alpha)
        # Only the start indices are stored (not a T x D table per block); non-persistent so DTR and DiT
        # checkpoints have the same keys.
        self.register_buffer("start", torch.from_numpy(start), persistent=False)

    def forward(self, x: torch.Tensor, t_index, t_emb: torch.Tensor) -> torch.Tensor:
        start = self.start[t_index] if isinstance(t_index, int) else self.start[t_index][:, None]
        c = torch.arange(self.hidden_size, device=x.device)
        mask = (c >= start) & (c < start + self.active)
        return mask.to(x.dtype).reshape(-1, 1, self.hidden_size)


def top_k_gates(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest probabilities per row, zero the rest; no renormalisation (as the paper)."""
    values, idx = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, values)


class SwitchRouter(nn.Module):
    """Switch-DiT SMoE: a gate on the timestep embedding picks k of M linear experts; mask = 1 + sum_j g_j E_j(z).

    Experts are linear, so the selected ones are merged per sample (sum_j g_j W_j) and applied with one
    batched matmul: the same function as sending each sample to its k experts, without gather/scatter.
    """

    def __init__(self, hidden_size: int, num_experts: int = 3, top_k: int = 2, mask_form: str = "one_plus"):
        super().__init__()
        if mask_form not in ("one_plus", "paper"):
            raise ValueError(f"mask_form must be 'one_plus' (authors' code) or 'paper', got {mask_form!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.offset = 1.0 if mask_form == "one_plus" else 0.0
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_experts, bias=True))
        # Expert j is z @ expert_weight[j] + expert_bias[j]; zero so the mask starts at exactly 1 (= DiT).
        self.expert_weight = nn.Parameter(torch.zeros(num_experts, hidden_size, hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def gate_logits(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(N, M) gate logits from the timestep embedding alone."""
        return self.gate(t_emb)

    def gates(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(N, M) sparse gate values: top-k of the softmax, zeros elsewhere."""
        return top_k_gates(self.gate_logits(t_emb).float().softmax(dim=-1), self.top_k)

    def forward(self, x: torch.Tensor, t_index, t_emb: torch.Tensor) -> torch.Tensor:
        uniform = isinstance(t_index, int)
        g = self.gates(t_emb[:1] if uniform else t_emb).to(x.dtype)
        w = torch.einsum("nm,mio->nio", g, self.expert_weight.to(x.dtype))
        # In full precision the "1 +" rides on the fused bias add; under autocast it is added after the
        # low-precision matmul, since 1 + e in bf16 would round away expert outputs below 2^-8.
        amp = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta: FLOP counting
        b = g @ self.expert_bias.to(x.dtype) + (0.0 if amp else self.offset)
        e = F.linear(x, w[0].t(), b[0]) if uniform else torch.baddbmm(b.unsqueeze(1), x, w)
        return e.to(x.dtype) + self.offset if amp else e


def reference_switch_mask(router: SwitchRouter, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """Straightforward gather/scatter SMoE, as a sparse dispatcher does it (and the authors' code): the
    (sample, expert) pairs are sorted by expert, the samples gathered, each expert run on its share, the
    outputs scaled by their gates and scattered back with index_add.

    Used by the tests (equivalence) and the benchmark (speed baseline); not by the model.
    """
    probs = router.gate_logits(t_emb).float().softmax(dim=-1)
    values, idx = probs.topk(router.top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, values)
    pairs = gates.nonzero()  # (P, 2) rows of (sample, expert)
    order = pairs[:, 1].argsort(stable=True)
    sample_index, expert_index = pairs[order, 0], pairs[order, 1]
    counts = torch.bincount(expert_index, minlength=router.num_experts).tolist()
    inputs = x.index_select(0, sample_index).split(counts, dim=0)
    outputs = [F.linear(inp, router.expert_weight[j].t(), router.expert_bias[j]) for j, inp in enumerate(inputs)]
    stitched = torch.cat(outputs, dim=0) * gates[sample_index, expert_index].to(x.dtype)[:, None, None]
    return torch.zeros_like(x).index_add(0, sample_index, stitched) + router.offset


ROUTERS = {"DiT": None, "DTR": DTRRouter, "Switch-DiT": SwitchRouter}
