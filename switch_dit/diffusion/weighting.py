"""Loss weightings over timesteps. constant / min-SNR / P2 weight the per-sample eps-MSE and add the VLB term
(variance only) as is; UW weights whole per-interval losses (MSE + VLB), as the authors' code does."""
from __future__ import annotations

import torch
import torch.nn as nn


class LossWeighting(nn.Module):
    """Constant weighting with uniform timesteps; subclasses change the weights, the sampling, or the reduction."""

    name = "constant"

    def sample_timesteps(self, n: int, num_timesteps: int, device, generator: torch.Generator | None = None):
        return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)

    def weights(self, t: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(snr)

    def combine(self, mse: torch.Tensor, vb: torch.Tensor, t: torch.Tensor, snr: torch.Tensor,
                num_timesteps: int) -> torch.Tensor:
        """Scalar loss from per-sample terms (B,)."""
        return (self.weights(t, snr) * mse + vb).mean()

    def log_values(self) -> dict[str, float]:
        return {}


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al., 2023) for eps prediction: min(SNR, gamma) / SNR."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def weights(self, t, snr):
        return snr.clamp(max=self.gamma) / snr


class P2Weighting(LossWeighting):
    """Perception-prioritised weighting (Choi et al., 2022): 1 / (k + SNR) ** gamma."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        super().__init__()
        if not (k > 0 and gamma >= 0):
            raise ValueError(f"p2 weighting needs k > 0 and gamma >= 0, got k={k}, gamma={gamma}")
        self.k, self.gamma = k, gamma

    def weights(self, t, snr):
        return 1.0 / (self.k + snr) ** self.gamma


class UncertaintyWeighting(LossWeighting):
    """ANT's uncertainty weighting "UW": t split into K equal intervals, each batch stratified over them, and
    sum_c 0.5 * (exp(-s_c) * L_c + s_c) with learnable log-variances s_c (start 0; own lr 0.025, no decay).

    As the authors' code computes it: L_c is the mean over interval c's samples of the whole per-sample loss
    MSE + VLB, divided by K; the prior loss is added outside."""

    name = "uw"
    lr = 0.025

    def __init__(self, num_intervals: int = 8):
        super().__init__()
        if num_intervals < 1:
            raise ValueError(f"num_intervals must be >= 1, got {num_intervals}")
        self.num_intervals = num_intervals
        self.log_vars = nn.Parameter(torch.zeros(num_intervals))

    def interval(self, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        return (t * self.num_intervals) // num_timesteps

    def sample_timesteps(self, n, num_timesteps, device, generator=None):
        if num_timesteps < self.num_intervals:
            raise ValueError(f"{num_timesteps} timesteps cannot fill {self.num_intervals} UW intervals")
        # An equal share of the batch per interval; the remainder goes to the first intervals.
        c = torch.arange(n, device=device) % self.num_intervals
        lo = (c * num_timesteps + self.num_intervals - 1) // self.num_intervals  # first t with interval(t) == c
        hi = ((c + 1) * num_timesteps + self.num_intervals - 1) // self.num_intervals
        u = torch.rand(n, device=device, generator=generator)
        return (lo + (u * (hi - lo)).long().clamp(max=hi - lo - 1)).long()

    def combine(self, mse, vb, t, snr, num_timesteps):
        c = self.interval(t, num_timesteps)
        loss = mse + vb
        counts = torch.bincount(c, minlength=self.num_intervals).to(loss.dtype)
        sums = torch.zeros(self.num_intervals, dtype=loss.dtype, device=loss.device).index_add(0, c, loss)
        # Intervals absent from the batch (batch < K) add nothing: a where, not a boolean index (no host sync).
        present = counts > 0
        L = sums / counts.clamp(min=1) / self.num_intervals
        s = self.log_vars.to(loss.dtype)
        return torch.where(present, 0.5 * (torch.exp(-s) * L + s), torch.zeros_like(L)).sum()

    def log_values(self):
        return {f"uw/log_var_{i}": float(v) for i, v in enumerate(self.log_vars.detach().cpu())}


WEIGHTINGS = {"constant": LossWeighting, "min_snr": MinSNRWeighting, "p2": P2Weighting, "uw": UncertaintyWeighting}


def create_weighting(name: str = "constant", **kwargs) -> LossWeighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {name!r}: choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](**kwargs)
