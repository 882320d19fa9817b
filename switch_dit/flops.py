"""GFLOPs of one forward pass for one sample, counted by torch (no model weights needed: runs on 'meta')."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_gflops(name: str, input_size: int, in_channels: int, num_classes: int = 10, compiled_sampling: bool = False,
                   **options) -> float:
    """Multiply-accumulates / 1e9 of model(x, t, y) for one sample at one timestep.

    DiT and Switch-DiT report "GFLOPs" as multiply-accumulates (fvcore's convention: DiT-XL/2 = 118.6),
    so this counts MACs (torch's FLOP count / 2). Switch-DiT here runs the merged experts: one D x D
    matmul per token and block, fewer than routing each token through k experts. Token-routed mixtures count
    their active experts (top-k / capacity factor per token on average), which is what an eager forward computes
    (token choice applies each expert to exactly its tokens, or pads small groups by at most a quarter of the
    routed slots; see models/moe.py). ``compiled_sampling`` counts what a sampling forward
    computes under torch.compile instead: token choice's static-shape path is dropless in eval mode through fixed
    buffers that run every token through every expert's slot, E / k times the active routed FLOPs."""
    from .models import create_model

    with torch.device("meta"):
        model = create_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                             **options).eval()
        # Mixtures size their expert buffers from the batch's token count, rounded: a batch of 4 E samples makes
        # every balanced share and expert-choice capacity whole (one sample of 1 token would count 8 experts for
        # top-2 of 8), and the count is divided back to one sample. On 'meta' the batch size costs nothing.
        n = 4 * max(m.num_experts for m in model.mixtures) if model.mixtures else 1
        x = torch.empty(n, in_channels, input_size, input_size)
        t = torch.zeros(n, dtype=torch.long)
        y = torch.zeros(n, dtype=torch.long)
    model.to("meta")  # buffers made from numpy (positions, tables) too
    for m in model.mixtures:  # token choice at its active compute: each expert holds exactly its balanced share
        if hasattr(m, "top_k") and not compiled_sampling:
            model.train()
            m.capacity_factor = 1.0
        if hasattr(m, "predictor") and not compiled_sampling:  # DiffMoE: its training capacity, as sampled on average
            model.train()
    with FlopCounterMode(display=False) as counter:  # grad mode: no host sync on meta tensors
        model(x, t, y)
    return counter.get_total_flops() / n / 2 / 1e9


def active_parameters(model) -> int:
    """Parameters that act on one token: all of them, less the routed experts a token does not reach (token choice:
    all but its top-k; expert choice: all but the capacity factor, on average). Works on a 'meta' model too."""
    total = sum(p.numel() for p in model.parameters())
    for m in getattr(model, "mixtures", []):
        per_expert = sum(p[0].numel() for p in m.experts.parameters())
        active = getattr(m, "top_k", None) or m.capacity_factor
        total -= round((m.num_experts - active) * per_expert)
    return total
