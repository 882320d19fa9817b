"""Diffusion prior loss (method.md section 5): Hungarian-matched JSD between dense gates and a DTR-like prior."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from .routing import dtr_table


def prior_table(num_blocks: int, num_experts: int, top_k: int, num_timesteps: int = 1000, alpha: float = 4.0):
    """(T, N*M) prior over the block-major expert slots: DTR with C = N*M and w = k*N ones per row."""
    return dtr_table(num_blocks * num_experts, num_timesteps, top_k * num_blocks, alpha)


def hamming_cost(learned: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """cost[a, b] = sum_t |learned[t, a] - prior[t, b]| for binary columns, as one small matmul."""
    learned, prior = learned.float(), prior.float()
    return learned.sum(0)[:, None] + prior.sum(0)[None, :] - 2.0 * learned.t() @ prior


def match_columns(cost: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """Exact linear assignment; returns perm with learned slot a matched to prior slot perm[a].

    Both column orders are shuffled first so that ties are broken at random (as the authors do).
    """
    n = cost.shape[0]
    pa = torch.randperm(n, generator=generator).numpy()
    pb = torch.randperm(n, generator=generator).numpy()
    rows, cols = linear_sum_assignment(cost[np.ix_(pa, pb)])
    perm = np.empty(n, dtype=np.int64)
    perm[pa[rows]] = pb[cols]
    return perm


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence of distributions p, q (..., K); eps inside the logs as the authors."""
    a = 0.5 * (p + q)
    log_a = torch.log(a + eps)
    kl_pa = (p * (torch.log(p + eps) - log_a)).sum(-1)
    kl_qa = (q * (torch.log(q + eps) - log_a)).sum(-1)
    return 0.5 * kl_pa + 0.5 * kl_qa


class DiffusionPrior(nn.Module):
    """Computes the prior loss from the gate logits of every block at every timestep.

    The shuffle generator is seeded explicitly (``seed``) and advanced once per call, so every DDP rank
    draws the same tie-breaking; its state is exposed for checkpoints by ``rng_state``/``set_rng_state``.
    """

    def __init__(self, num_blocks: int, num_experts: int, top_k: int, num_timesteps: int = 1000,
                 alpha: float = 4.0, seed: int = 0):
        super().__init__()
        self.num_blocks, self.num_experts, self.top_k = num_blocks, num_experts, top_k
        self.register_buffer("table", prior_table(num_blocks, num_experts, top_k, num_timesteps, alpha), persistent=False)
        self.generator = torch.Generator().manual_seed(seed)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def learned_pattern(self, logits_all: torch.Tensor) -> torch.Tensor:
        """(T, N*M) binary top-k pattern from gate logits (T, N, M); no gradient."""
        with torch.no_grad():
            idx = logits_all.topk(self.top_k, dim=-1).indices
            pattern = torch.zeros_like(logits_all, dtype=torch.float32).scatter_(-1, idx, 1.0)
        return pattern.flatten(1)

    def start_matching(self, logits_all: torch.Tensor):
        """Begin the matching from the gate logits of all T timesteps (no gradient needed).

        Only the (NM x NM) cost matrix goes to the host; on CUDA the copy is asynchronous, so calling this
        before the blocks run keeps the host-side Hungarian solve off the critical path.
        """
        cost = hamming_cost(self.learned_pattern(logits_all), self.table)
        if cost.is_cuda:
            host = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
            host.copy_(cost, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event
        return cost, None

    def finish_matching(self, pending) -> torch.Tensor:
        """The prior table with its columns aligned to the learned slots by the Hungarian matching."""
        cost, event = pending
        if event is not None:
            event.synchronize()
        perm = match_columns(cost.numpy().astype(np.float64), self.generator)
        return self.table[:, torch.from_numpy(perm).to(self.table.device)]

    def matched_prior(self, logits_all: torch.Tensor) -> torch.Tensor:
        return self.finish_matching(self.start_matching(logits_all))

    def forward(self, target, batch_logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean JSD over the batch. ``target`` is the matched prior table (T, N*M) (``matched_prior``; the
        trainer computes it outside a compiled forward) or a pending match from ``start_matching``;
        batch_logits (B, N, M) are the gate logits of the batch's timesteps (with gradient), t their tasks (B,)."""
        table = target if torch.is_tensor(target) else self.finish_matching(target)
        q = table[t] / (self.top_k * self.num_blocks)
        p = batch_logits.float().softmax(dim=-1).flatten(1) / self.num_blocks
        return js_divergence(p, q).mean()
