"""State dicts written by other code: wrapper prefixes, and the authors' Switch-DiT / DTR naming.

The authors' code keeps the routers beside the blocks (``routers.{i}``) with the gate as ``f_gate`` and the
experts as ``experts.w`` (M x in x out, the same layout as ``expert_weight``) and ``experts.b``; it also
stores buffers we recompute (``full_time``, ``prior._unit_mapping``, ``routers.{i}._unit_mapping``).
"""
from __future__ import annotations

import re

_ROUTER_KEY = re.compile(r"^routers\.(\d+)\.(.+)$")
_RENAMES = {"f_gate.1.weight": "gate.1.weight", "f_gate.1.bias": "gate.1.bias",
            "experts.w": "expert_weight", "experts.b": "expert_bias"}
_RECOMPUTED = ("full_time", "prior._unit_mapping")


def strip_wrapper_prefixes(state: dict) -> dict:
    """Drop the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes that wrapped models add to keys."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def is_authors_layout(state: dict) -> bool:
    return any(_ROUTER_KEY.match(k) for k in state)


def authors_variant(state: dict) -> str:
    """'Switch-DiT' (gates and experts), 'DTR' (mask tables only) or 'DiT'."""
    if any(k.startswith("routers.") and ".f_gate." in k for k in state):
        return "Switch-DiT"
    return "DTR" if is_authors_layout(state) else "DiT"


def from_authors_state_dict(state: dict) -> dict:
    """The authors' keys in our layout: routers move into their blocks; recomputed buffers are dropped."""
    out = {}
    for k, v in state.items():
        m = _ROUTER_KEY.match(k)
        if m:
            block, rest = m.groups()
            if rest == "_unit_mapping":  # DTR's mask table: recomputed from dtr_alpha / dtr_beta
                continue
            if rest not in _RENAMES:
                raise KeyError(f"unexpected router entry {k!r}")
            out[f"blocks.{block}.router.{_RENAMES[rest]}"] = v
        elif k not in _RECOMPUTED:
            out[k] = v
    return out


__all__ = ["strip_wrapper_prefixes", "is_authors_layout", "authors_variant", "from_authors_state_dict"]
