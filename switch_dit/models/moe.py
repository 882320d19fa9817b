"""Token-routed FFN mixtures that replace a block's MLP: token choice (TC-MoE, as DiT-MoE) and expert choice
(EC-MoE, as EC-DiT and DiffMoE's EC baseline). The attention and adaLN of the block stay as in DiT.

Both use fine-grained experts (DeepSeek-MoE): every expert is the block's GELU FFN with hidden width
mlp_ratio * D / (k + s), where k is the number of routed experts a token gets (top-k for token choice, the
capacity factor for expert choice, on average) and s the number of always-on shared experts. So the active
parameters per token are those of the dense FFN (plus the gate's D x E), and the three variants differ only in
how tokens reach their FFN weights.

Dispatch sorts the token slots by expert once and applies the experts as matmuls, never a loop over tokens. Expert
choice and token choice under torch.compile use static shapes (fixed-size per-expert buffers, two batched
matmuls), so the forward compiles into one graph without a host sync. Token choice run eagerly reads its E
expert counts on the host (one sync per block) and computes what the tokens need: a loop applying each expert to
exactly its tokens, as DiT-MoE's, or, for small groups, one batched matmul over buffers as long as the busiest
expert's group when that pads by at most a quarter. The fixed buffers compute the capacity instead (1.25x in
training; in dropless sampling every token for every expert, E / k times the routed FLOPs).

A mixture's forward returns ``(y, aux)``: the output and its auxiliary loss (token choice: DeepSeek-MoE's and
DiT-MoE's load-balancing loss, counted over all k choices; expert choice: None, balanced by construction). Counters of routed and dropped token
slots accumulate in non-persistent buffers for logging (``pop_stats``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Mlp


def expert_hidden_size(hidden_size: int, mlp_ratio: float, active: float, num_shared: int) -> int:
    """Hidden width of one fine-grained expert: the dense FFN's width split over the active experts."""
    return max(1, round(hidden_size * mlp_ratio / (active + num_shared)))


# Eager token choice applies each expert to exactly its slots (a loop over experts) unless the experts' groups are
# small (fewer than LOOP_ROWS slots on average), where one batched matmul over buffers as long as the busiest
# expert's group is no slower on a CPU (bench_moe's "loop dispatch" column) and launches 2 kernels instead of 2 E,
# as long as those buffers hold at most PAD_LIMIT x the routed slots.
LOOP_ROWS = 1024
PAD_LIMIT = 1.25


def _recomputing() -> bool:
    """True while activation checkpointing recomputes a block's forward inside backward: counters and thresholds
    must not move a second time for the same tokens."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """bincount with a static length (compiles without a graph break, runs on 'meta' for FLOP counting)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


class Experts(nn.Module):
    """E GELU FFNs (D -> H -> D) held as stacked weights and applied to (E, C, D) buffers with two bmm's."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # as DiT initialises every nn.Linear (xavier uniform, zero bias), one expert at a time
        for w, (fan_in, fan_out) in ((self.w1, (dim, hidden)), (self.w2, (hidden, dim))):
            nn.init.uniform_(w, -math.sqrt(6.0 / (fan_in + fan_out)), math.sqrt(6.0 / (fan_in + fan_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype  # under autocast the bmm's run in low precision; the buffers keep their dtype
        h = torch.baddbmm(self.b1.to(dt).unsqueeze(1), x, self.w1.to(dt))
        return torch.baddbmm(self.b2.to(dt).unsqueeze(1), F.gelu(h, approximate="tanh"), self.w2.to(dt))

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts on rows (N, D) sorted by expert, counts[e] rows for expert e: each expert computes exactly
        its rows (no padding; the eager dispatch). split/unbind, not x[a:b]/w[e]: their backward passes build each
        gradient once (one cat, one stack), not one zero-filled full-size gradient per expert."""
        dt, outs = x.dtype, []
        for xe, w1, b1, w2, b2 in zip(x.split(counts), self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0),
                                      self.b2.unbind(0)):
            h = F.gelu(torch.addmm(b1.to(dt), xe, w1.to(dt)), approximate="tanh")
            outs.append(torch.addmm(b2.to(dt), h, w2.to(dt)))
        return torch.cat(outs)

    def reference(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on tokens (n, D), written plainly (tests and the benchmark's loop reference)."""
        h = F.gelu(x @ self.w1[e] + self.b1[e], approximate="tanh")
        return h @ self.w2[e] + self.b2[e]


class TokenMixture(nn.Module):
    """Shared pieces of the token-routed FFNs: gate, experts, shared expert, routing counters."""

    kind = ""

    def __init__(self, hidden_size: int, num_experts: int, active: float, num_shared: int, mlp_ratio: float):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"moe_experts must be >= 1, got {num_experts}")
        if num_shared < 0:
            raise ValueError(f"moe_shared must be >= 0, got {num_shared}")
        self.num_experts = num_experts
        self.num_shared = num_shared
        self.expert_hidden = expert_hidden_size(hidden_size, mlp_ratio, active, num_shared)
        dense = hidden_size * mlp_ratio
        if abs(self.expert_hidden * (active + num_shared) - dense) > 0.05 * dense:  # fine-grained: as the dense FFN
            raise ValueError(f"{active:g} routed + {num_shared} shared experts per token cannot split the dense FFN's "
                             f"width {dense:g} into equal experts (each would be {dense / (active + num_shared):.2f} "
                             "wide, rounded to a whole number, more than 5% off in all); use fewer experts per token")
        self.gate_weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.experts = Experts(num_experts, hidden_size, self.expert_hidden)
        # s shared experts are one FFN of width s * H (as DiT-MoE merges its two)
        self.shared = Mlp(hidden_size, num_shared * self.expert_hidden) if num_shared else None
        # counters for logging: [tokens, token-expert slots computed, slots dropped (over capacity), tokens that got
        # no routed expert]
        self.register_buffer("stats", torch.zeros(4), persistent=False)
        self.record = False  # analysis: keep the last forward's (tokens, E) 0/1 assignment in ``last_assign``
        self.calibrating = False  # DiffMoE: calibrate_thresholds' no-grad pass (training routing, nothing counted)
        self.last_assign: torch.Tensor | None = None
        # True: the static-shape dispatch torch.compile traces (and FLOP counting on 'meta' runs), also eagerly
        self.static_dispatch = False

    def _static(self, x: torch.Tensor) -> bool:
        """Static shapes: under torch.compile, on 'meta' (FLOP counting), or when asked."""
        return self.static_dispatch or torch.compiler.is_compiling() or x.device.type == "meta"

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) softmax of the token-expert affinities, computed in float32 even under autocast (the router's
        selective precision, as Switch Transformer): bf16 logits would make near-ties of top-k device-dependent."""
        if torch.amp.is_autocast_available(x.device.type):  # ('meta', for FLOP counting, has no autocast)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.gate_weight.float()).softmax(dim=-1)
        return F.linear(x.float(), self.gate_weight.float()).softmax(dim=-1)

    def pop_stats(self) -> torch.Tensor:
        """The counters since the last call, zeroed."""
        s = self.stats.clone()
        self.stats.zero_()
        return s

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.shared is None else y + self.shared(x)


class TokenChoiceMoE(TokenMixture):
    """Token choice (DiT-MoE): each token's softmax gate picks its top-k experts, gate values not renormalised,
    plus always-on shared experts; a load-balancing loss alpha * E * sum_i f_i P_i (f_i: fraction of token slots
    sent to expert i, P_i: its mean gate probability).

    DiT-MoE trains dropless; the capacity here is GShard's and Switch Transformer's, the usual way to bound an
    expert's buffer: in training each expert holds at most C = ceil(capacity_factor * k * tokens / E) of the batch's
    token slots (first choices before second choices, then token order); the slots over capacity are dropped
    (their gate's share of the output is zero, the token keeps the residual and the shared expert) and counted.
    In eval mode routing is dropless (C = tokens), so a sample's output does not depend on the rest of its batch.
    ``capacity_factor = 0`` is dropless in training too, as DiT-MoE.

    Eagerly the kept counts are read on the host (one sync per block) and the experts compute their kept slots
    (a loop over experts), or, for groups below LOOP_ROWS slots, buffers as long as the busiest group (at most
    PAD_LIMIT x the kept slots); under torch.compile, or with ``static_dispatch = True``, fixed (E, C) buffers
    (static shapes, no host sync) compute C slots per expert, in dropless sampling E / k times the routed FLOPs
    (``forward_gflops(compiled_sampling=True)``). All give the same outputs and gradients to float rounding."""

    kind = "token-choice"

    def __init__(self, hidden_size: int, num_experts: int = 8, top_k: int = 2, num_shared: int = 1,
                 capacity_factor: float = 1.25, aux_alpha: float = 0.01, mlp_ratio: float = 4.0):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_top_k must satisfy 1 <= moe_top_k <= moe_experts={num_experts}, got {top_k}")
        if not (capacity_factor == 0 or capacity_factor > 0) or not math.isfinite(capacity_factor):
            raise ValueError(f"moe_capacity_factor must be a finite number >= 0 (0 = dropless), got {capacity_factor}")
        if aux_alpha < 0 or not math.isfinite(aux_alpha):
            raise ValueError(f"moe_aux_alpha must be a finite number >= 0, got {aux_alpha}")
        super().__init__(hidden_size, num_experts, top_k, num_shared, mlp_ratio)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_alpha = aux_alpha
        nn.init.kaiming_uniform_(self.gate_weight, a=math.sqrt(5))  # nn.Linear's default, as DiT-MoE's gate

    def capacity(self, num_tokens: int) -> int:
        if not self.training or self.capacity_factor <= 0:
            return num_tokens  # dropless: a token chooses an expert at most once
        return min(num_tokens, math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, D = x.shape
        T, E, k = B * L, self.num_experts, self.top_k
        xt = x.reshape(T, D)
        probs = self.gate_probs(xt)
        gates, choice = probs.topk(k, dim=-1)  # (T, k)
        C = self.capacity(T)
        # Slots in priority order: all first choices (token order), then all second choices, ...
        expert = choice.t().reshape(-1)  # (k*T,)
        order = torch.argsort(expert, stable=True)  # the one sort: slots grouped by expert, priority kept
        counts = _count(expert, E)
        kept_n = counts.clamp(max=C)
        kept = None if self._static(x) else kept_n.tolist()  # eager: one host read of the E kept counts
        loop = kept is not None and (sum(kept) >= LOOP_ROWS * E or E * max(kept) > PAD_LIMIT * sum(kept))
        may_drop = kept is None or sum(kept) < k * T
        pos = keep = None  # keep None: no slot dropped
        if may_drop or not loop:
            first = counts.cumsum(0) - counts  # where each expert's group starts in the sorted order
            pos_sorted = torch.arange(k * T, device=x.device) - first[expert[order]]
            pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)  # queue position of each slot
            if may_drop:
                keep = pos < C
        if loop:
            y = self._dispatch_exact(xt, gates, order, counts, kept_n, kept)
        else:
            y = self._dispatch_buffers(xt, gates, expert, keep, pos, C if kept is None else max(kept))
        aux = None
        if self.training and self.aux_alpha > 0:
            f = counts.float() * (E / (k * T))  # every chosen slot counts, dropped or not (DiT-MoE has no drops)
            aux = self.aux_alpha * (f * probs.mean(0)).sum()
        with torch.no_grad():
            # python numbers enter as kernel scalars: no host-to-device copy (which would sync a CUDA stream)
            if not _recomputing():
                if keep is None:
                    self.stats[0] += T
                    self.stats[1] += k * T
                else:
                    dropped = (~keep).sum().float()
                    self.stats += torch.stack([torch.full_like(dropped, T), k * T - dropped, dropped,
                                               (~keep.view(k, T)).all(0).sum().float()])
            if self.record:
                assign = F.one_hot(choice, E).float()
                if keep is not None:
                    assign = assign * keep.view(k, T).t()[..., None].float()
                self.last_assign = assign.sum(1)
        return self._finish(xt, y).view(B, L, D), aux

    def _dispatch_buffers(self, xt, gates, expert, keep, pos, C):
        """(E, C) buffers, one per expert, and two batched matmuls. C is the capacity under torch.compile (static
        shapes, no host sync; it computes C slots per expert however many arrive) and the busiest expert's kept
        count in eager mode. keep None: no slot dropped."""
        (T, D), E = xt.shape, self.num_experts
        w = gates.t().reshape(-1).to(xt.dtype)
        dest = expert * C + pos
        if keep is not None:
            dest = torch.where(keep, dest, E * C)  # E*C: a dump row for dropped slots
            w = w * keep
        token = torch.arange(T, device=xt.device).repeat(self.top_k)
        # buffer place -> its token (empty places point at the last token: their gate weight below is 0, so neither
        # their output nor any gradient through them counts)
        src = torch.full((E * C + 1,), T - 1, dtype=torch.long, device=xt.device).scatter_(0, dest, token)[:-1]
        w_buf = torch.zeros(E * C + 1, dtype=w.dtype, device=xt.device).scatter(0, dest, w)[:-1]
        # index_select/index_add, not x[index]: their backward passes are deterministic on CPU (advanced indexing's
        # is not); each token receives its k weighted expert outputs by one index_add
        out = self.experts(xt.index_select(0, src).view(E, C, D)).reshape(E * C, D)
        return torch.zeros_like(xt).index_add(0, src, out * w_buf[:, None])

    def _dispatch_exact(self, xt, gates, order, counts, kept_n, kept):
        """The kept slots sorted by expert, each expert applied to exactly its kept[e] slots (a loop over experts,
        as DiT-MoE's): the routed FLOPs and no more."""
        T, total = xt.shape[0], sum(kept)
        slots = order
        if total < order.numel():  # drops: each expert's group keeps its first kept[e] slots, found without a sync
            skip = torch.repeat_interleave((counts.cumsum(0) - counts) - (kept_n.cumsum(0) - kept_n), kept_n,
                                           output_size=total)
            slots = order.index_select(0, torch.arange(total, device=xt.device) + skip)
        token = slots % T  # slot j * T + t is token t's (j+1)-th choice
        w = gates.t().reshape(-1).index_select(0, slots).to(xt.dtype)
        out = self.experts.grouped(xt.index_select(0, token), kept)
        return torch.zeros_like(xt).index_add(0, token, out * w[:, None])


class ExpertChoiceMoE(TokenMixture):
    """Expert choice: each expert takes the C tokens of its pool with the highest softmax affinity,
    C = capacity_factor * tokens / E, and weights its output by that affinity; plus always-on shared experts.
    Balanced by construction (no auxiliary loss); a token may get 0 to E routed experts, on average
    capacity_factor.

    scope = "sample": each sample's tokens are their own pool, as EC-DiT and DiffMoE's EC baseline
    (batch-independent). scope = "batch": the pool is all tokens of the batch, DiffMoE's global token pool
    without its capacity predictor: in training the pool mixes timesteps, so experts can give noisy and clean
    tokens different compute; in sampling every token of a batch shares one timestep, so each step gets the
    average compute, the guided pair competes in one pool, and a sample's output depends on its batch (DiffMoE
    replaces top-C by its learned thresholds at inference for this reason)."""

    kind = "expert-choice"

    def __init__(self, hidden_size: int, num_experts: int = 8, capacity_factor: float = 2.0, num_shared: int = 1,
                 scope: str = "batch", mlp_ratio: float = 4.0):
        if not (capacity_factor > 0 and math.isfinite(capacity_factor)) or capacity_factor > num_experts:
            raise ValueError(f"moe_capacity_factor for expert choice must be in (0, moe_experts={num_experts}] "
                             f"(the mean number of routed experts per token), got {capacity_factor}")
        if scope not in ("batch", "sample"):
            raise ValueError(f"moe_scope must be 'batch' or 'sample', got {scope!r}")
        super().__init__(hidden_size, num_experts, capacity_factor, num_shared, mlp_ratio)
        self.capacity_factor = capacity_factor
        self.scope = scope
        nn.init.normal_(self.gate_weight, std=0.006)  # as DiffMoE's EC gate

    def capacity(self, pool: int) -> int:
        return max(1, min(pool, int(round(self.capacity_factor * pool / self.num_experts))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, L, D = x.shape
        xt = x.reshape(B * L, D)
        y, _ = self._route(xt, L)
        return self._finish(xt, y).view(B, L, D), None

    def _route(self, xt: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' output for tokens (T, D) of samples of L tokens, and each expert's picks (E, G*C)."""
        (T, D), E = xt.shape, self.num_experts
        pool = L if self.scope == "sample" else T
        G = T // pool
        C = self.capacity(pool)
        probs = self.gate_probs(xt)  # (T, E)
        affinity, index = probs.view(G, pool, E).transpose(1, 2).topk(C, dim=-1)  # (G, E, C): each expert's picks
        index = index + (torch.arange(G, device=xt.device) * pool).view(G, 1, 1)  # pool-local -> batch token
        index = index.transpose(0, 1).reshape(E, G * C)
        picked = xt.index_select(0, index.reshape(-1)).view(E, G * C, D)  # deterministic backward (see above)
        out = self.experts(picked) * affinity.transpose(0, 1).reshape(E, G * C, 1).to(xt.dtype)
        y = torch.zeros_like(xt).index_add(0, index.reshape(-1), out.reshape(-1, D))
        with torch.no_grad():
            self._count_routing(T, index.reshape(-1), torch.arange(E, device=xt.device).repeat_interleave(G * C))
        return y, index

    def _count_routing(self, T: int, token: torch.Tensor, expert: torch.Tensor) -> None:
        """Counters and the recorded assignment from the routed (token, expert) pairs."""
        if not _recomputing() and not self.calibrating:
            hits = _count(token, T)
            self.stats[0] += T  # python scalars, no host-to-device copy
            self.stats[1] += token.numel()
            self.stats[3] += (hits == 0).sum().float()
        if self.record:
            self.last_assign = self._assignment(T, token, expert)

    def _assignment(self, T: int, token: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """(T, E) 0/1: 1 where an expert picked a token."""
        return torch.zeros(T, self.num_experts, device=token.device).index_put_(
            (token, expert), torch.ones((), device=token.device))


class CapacityPredictorMoE(ExpertChoiceMoE):
    """DiffMoE (Shi et al. 2025): expert choice over the batch's global token pool in training, as batch-scope
    EC-MoE, plus a capacity predictor, a D -> D -> E MLP (SiLU) on the detached tokens, trained by binary
    cross-entropy (weight aux_alpha, DiffMoE's 0.01 per block) to predict which experts pick each token. Every
    training step moves each expert's threshold, an EMA (decay 0.95), towards the C-th highest predicted probability
    of the batch (averaged over processes under DDP). In eval mode expert e takes as many tokens as the predictor puts
    above its threshold, the ones of highest affinity, as DiffMoE's inference: compute follows the predicted need,
    so a sampling step's cost depends on its timestep, and a sample still depends on its batch (top-k within it).
    Eagerly that reads the E counts on the host; under torch.compile (static shapes) every expert computes every
    token and the unpicked ones get weight 0 (the same picks, exact ties in affinity aside). A threshold starts at
    its first quantile (not an EMA rising from 0). The EMA model has its own averaged predictor, so thresholds
    tracked for the model's predictor do not fit it: the trainer sets its thresholds with calibrate_thresholds
    before every checkpoint and sample grid."""

    kind = "expert-choice, predicted capacity"

    def __init__(self, hidden_size: int, num_experts: int = 8, capacity_factor: float = 2.0, num_shared: int = 1,
                 aux_alpha: float = 0.01, mlp_ratio: float = 4.0, threshold_decay: float = 0.95):
        if not (aux_alpha > 0 and math.isfinite(aux_alpha)):  # 0 would leave the predictor, which sizes sampling, random
            raise ValueError(f"moe_aux_alpha (the capacity predictor's loss weight) must be a finite number > 0, "
                             f"got {aux_alpha}")
        super().__init__(hidden_size, num_experts, capacity_factor, num_shared, "batch", mlp_ratio)
        self.aux_alpha = aux_alpha
        self.threshold_decay = threshold_decay
        self.predictor = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                       nn.Linear(hidden_size, num_experts))
        self.register_buffer("threshold", torch.zeros(num_experts))  # in checkpoints: sampling needs it

    def predict(self, xt: torch.Tensor) -> torch.Tensor:
        """(T, E) logits of 'expert e picks this token', in float32 (as the gate), without gradient into the
        backbone (DiffMoE trains the predictor on detached tokens)."""
        lin1, act, lin2 = self.predictor

        def run():
            h = act(F.linear(xt.detach().float(), lin1.weight.float(), lin1.bias.float()))
            return F.linear(h, lin2.weight.float(), lin2.bias.float())

        if torch.amp.is_autocast_available(xt.device.type):  # ('meta' has no autocast)
            with torch.autocast(xt.device.type, enabled=False):
                return run()
        return run()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, D = x.shape
        T, E = B * L, self.num_experts
        xt = x.reshape(T, D)
        logits = self.predict(xt)
        if not (self.training or self.calibrating):
            return self._finish(xt, self._route_predicted(xt, logits)).view(B, L, D), None
        y, index = self._route(xt, L)
        aux = None
        if self.training:
            picked = self._assignment(T, index.reshape(-1),
                                      torch.arange(E, device=x.device).repeat_interleave(index.shape[1]))
            aux = self.aux_alpha * F.binary_cross_entropy_with_logits(logits, picked)
        with torch.no_grad():
            # the C-th highest predicted probability of each expert: where its threshold should sit (once a step:
            # not again when activation checkpointing recomputes this forward during backward)
            if not _recomputing():
                quantile = torch.sigmoid(logits).topk(index.shape[1], dim=0).values[-1]
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(quantile)
                    quantile /= torch.distributed.get_world_size()
                if self.calibrating:
                    self.threshold.copy_(quantile)
                else:  # a threshold still at its initial 0 starts at the quantile (no slow rise from 0)
                    self.threshold.copy_(torch.where(self.threshold == 0, quantile,
                                                     self.threshold.lerp(quantile, 1.0 - self.threshold_decay)))
        return self._finish(xt, y).view(B, L, D), aux

    def _route_predicted(self, xt: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Eval: expert e takes its k_e tokens of highest affinity, k_e = the tokens predicted above its threshold."""
        (T, D), E = xt.shape, self.num_experts
        probs = self.gate_probs(xt)
        k = (torch.sigmoid(logits) > self.threshold).sum(0)  # (E,)
        if self._static(xt):  # static shapes: every expert computes every token
            rank = probs.argsort(dim=0, descending=True).argsort(dim=0)  # (T, E): 0 = the expert's first pick
            chosen = rank < k
            out = self.experts(xt.unsqueeze(0).expand(E, T, D)) * (probs * chosen).t().to(xt.dtype)[..., None]
            with torch.no_grad():
                self.stats[0] += T
                self.stats[1] += E * T  # computed, most of it at weight 0
                self.stats[3] += (~chosen.any(1)).sum().float()
                if self.record:
                    self.last_assign = chosen.float()
            return out.sum(0)
        counts = k.tolist()  # one host read per block
        picks = [probs[:, e].topk(c) for e, c in enumerate(counts)]
        token = torch.cat([i for _, i in picks])
        weight = torch.cat([a for a, _ in picks]).to(xt.dtype)
        out = self.experts.grouped(xt.index_select(0, token), counts)
        with torch.no_grad():
            self._count_routing(T, token, torch.arange(E, device=xt.device).repeat_interleave(k))
        return torch.zeros_like(xt).index_add(0, token, out * weight[:, None])


def reference_token_choice(moe: TokenChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Token choice written as a loop over experts: expert e lists the tokens choosing it in priority order (every
    first choice in token order, then every second choice, ...), keeps the first C and adds its gate-weighted
    output to them."""
    B, L, D = x.shape
    xt = x.reshape(-1, D)
    gates, choice = moe.gate_probs(xt).topk(moe.top_k, dim=-1)
    C = moe.capacity(xt.shape[0])
    y = torch.zeros_like(xt)
    for e in range(moe.num_experts):
        rank, token = (choice.t() == e).nonzero(as_tuple=True)  # row-major: rank-major, then token order
        rank, token = rank[:C], token[:C]
        y = y.index_add(0, token, gates[token, rank, None].to(x.dtype) * moe.experts.reference(xt[token], e))
    return moe._finish(xt, y).view(B, L, D)


def reference_expert_choice(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Expert choice written as a loop over pools and experts."""
    B, L, D = x.shape
    xt = x.reshape(-1, D)
    probs = moe.gate_probs(xt)
    pool = L if moe.scope == "sample" else B * L
    C = moe.capacity(pool)
    y = torch.zeros_like(xt)
    for g in range(xt.shape[0] // pool):
        rows = slice(g * pool, (g + 1) * pool)
        for e in range(moe.num_experts):
            a, i = probs[rows, e].topk(C)
            i = i + g * pool
            y[i] += a[:, None].to(x.dtype) * moe.experts.reference(xt[i], e)
    return moe._finish(xt, y).view(B, L, D)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, forward) -> bool:
    """Set every DiffMoE threshold of ``model`` to its own predictor's C-th highest predicted probability on one
    batch routed as in training (expert choice over the batch's pool), averaged over processes under DDP: the
    thresholds the model would track if it trained on this batch, without the EMA's lag. forward(model) runs the
    batch once, in eval mode (no label dropout, no RNG drawn, no counters moved). Returns False, running nothing,
    when the model has no DiffMoE layer. Under DDP every process must call it (the quantiles are all-reduced)."""
    layers = [m for m in model.modules() if isinstance(m, CapacityPredictorMoE)]
    if not layers:
        return False
    was_training = model.training
    model.eval()
    try:
        for m in layers:
            m.calibrating = True
        forward(model)
    finally:
        for m in layers:
            m.calibrating = False
        model.train(was_training)
    return True


def reference_predicted_capacity(moe: CapacityPredictorMoE, x: torch.Tensor) -> torch.Tensor:
    """DiffMoE's inference written as a loop over experts: expert e counts the tokens whose predicted probability
    is above its threshold and takes that many of the highest affinity."""
    B, L, D = x.shape
    xt = x.reshape(-1, D)
    probs = moe.gate_probs(xt)
    predicted = torch.sigmoid(moe.predict(xt))
    y = torch.zeros_like(xt)
    for e in range(moe.num_experts):
        k = int((predicted[:, e] > moe.threshold[e]).sum())
        a, i = probs[:, e].topk(k)
        y[i] += a[:, None].to(x.dtype) * moe.experts.reference(xt[i], e)
    return moe._finish(xt, y).view(B, L, D)


MIXTURES = {"TC-MoE": TokenChoiceMoE, "EC-MoE": ExpertChoiceMoE, "DiffMoE": CapacityPredictorMoE}
