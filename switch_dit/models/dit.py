"""The DiT backbone (Peebles & Xie, 2023) with an optional router per block: DiT, DTR and Switch-DiT."""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import (Attention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder,
                     get_2d_sincos_pos_embed, modulate)
from .moe import MIXTURES, CapacityPredictorMoE, ExpertChoiceMoE, TokenChoiceMoE, TokenMixture
from .prior import DiffusionPrior
from .routing import ROUTERS, DTRRouter, SwitchRouter


@dataclass
class ModelOutput:
    """What every forward returns, in train and eval mode alike."""

    sample: torch.Tensor  # (N, out_channels, H, W): eps prediction, then the variance channels if learned
    aux_loss: torch.Tensor  # scalar, in training: lambda_dp * prior loss (Switch-DiT), the load-balancing loss
    # (TC-MoE); 0 in eval mode and for the other variants


class DiTBlock(nn.Module):
    """adaLN-Zero block; a router's mask m makes the branches see x*m while x*(1-m) skips to the end.
    ``mlp`` replaces the dense FFN by a token-routed mixture (TC-MoE, EC-MoE), which also returns an aux loss.
    forward returns (tokens, aux loss or None)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, router: nn.Module | None = None,
                 mlp: TokenMixture | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp if mlp is not None else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.mixture = mlp is not None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.router = router

    def forward(self, x: torch.Tensor, c: torch.Tensor, t_index, t_emb: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        mask = None if self.router is None else self.router(x, t_index, t_emb)
        z = x if mask is None else x * mask
        a = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(z), shift_msa, scale_msa))
        h = z + a
        f = self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        f, aux = f if self.mixture else (f, None)
        mlp = gate_mlp.unsqueeze(1) * f
        # With a mask, z*(1-m) skips both branches: (z + a + mlp) + x*(1-m) = x + a + mlp.
        return (h if mask is None else x + a) + mlp, aux


class DiT(nn.Module):
    """Diffusion transformer; ``router_factory`` (None for plain DiT) builds each block's router and
    ``mlp_factory`` (None: the dense FFN) each block's token-routed FFN mixture."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, router_factory=None,
                 prior: DiffusionPrior | None = None, lambda_dp: float = 1.0, num_timesteps: int = 1000,
                 grad_checkpointing: bool = False, mlp_factory=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.num_timesteps = num_timesteps
        self.lambda_dp = lambda_dp
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # The null-class row exists whenever labels can be dropped (Meta's DiT keeps it for one class too); the
        # trainer sets class_dropout_prob = 0 for one-class data, as the authors' Switch-DiT code, so no row.
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (not learned) positions; a buffer so the optimizer never sees it, saved as in DiT checkpoints.
        pos = get_2d_sincos_pos_embed(hidden_size, self.x_embedder.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0))
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, router_factory() if router_factory else None,
                     mlp_factory() if mlp_factory else None)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.prior = prior
        self.routed = router_factory is not None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def mixtures(self) -> list[TokenMixture]:
        """The token-routed FFN mixtures, one per block (empty for DiT, DTR and Switch-DiT)."""
        return [b.mlp for b in self.blocks if b.mixture]

    @property
    def switch_routers(self) -> list[SwitchRouter]:
        return [b.router for b in self.blocks if isinstance(b.router, SwitchRouter)]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) tokens -> (N, C, H, W) image."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def all_gate_logits(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(T, N_blocks, M) gate logits of every Switch block for timestep embeddings (T, D)."""
        return torch.stack([r.gate_logits(t_emb) for r in self.switch_routers], dim=1)

    def task_bins(self, t: torch.Tensor) -> torch.Tensor:
        """The task (of T) a timestep belongs to, for DTR's masks and the diffusion prior: integer DDPM
        timesteps are their own task; a continuous flow-matching input t_in = 1000 * t (t in [0, 1], scaled so the
        embedder sees DDPM's range; see switch_dit.flow) belongs to bin min(floor(t * T), T - 1)."""
        if not t.is_floating_point():
            return t
        return (t * (self.num_timesteps / 1000.0)).floor().long().clamp(0, self.num_timesteps - 1)

    @torch.no_grad()
    def matched_prior_table(self) -> torch.Tensor:
        """The diffusion prior matched to the gates' current expert pattern over all T tasks (T, N*M): the
        target of this step's prior loss. Its Hungarian solve runs on the host, so the trainer calls this
        outside the (compiled) forward and passes the result as ``prior_target``."""
        t_all = torch.arange(self.num_timesteps, device=self.pos_embed.device)
        return self.prior.matched_prior(self.all_gate_logits(self.t_embedder(t_all)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None, prior_target: torch.Tensor | None = None) -> ModelOutput:
        """x: (N, C, H, W) input, t: (N,) integer timesteps in [0, T) (DDPM) or floats 1000 * t, t in [0, 1]
        (flow matching), y: (N,) class labels.

        force_drop_ids (N,) of 0/1, if given, decides which labels become the null class (the trainer draws
        it from step-derived seeds, so that runs do not depend on the number of processes).
        prior_target: the matched prior table of this step (``matched_prior_table``), given by the trainer so
        that the forward has no host work and compiles into one graph; without it the model matches itself."""
        if x.shape[0] == 0:  # no tokens to route and nothing to average (capacities and the prior loss divide by N)
            c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
            h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
            return ModelOutput(sample=self.unpatchify(self.final_layer(h, c)),
                               aux_loss=torch.zeros((), device=x.device, dtype=torch.float32))
        use_prior = self.training and self.prior is not None and self.lambda_dp > 0
        if use_prior and prior_target is None:
            # The expert pattern of all T tasks needs no gradient: one no-grad pass of the timestep MLP and
            # gates per step, and the matching starts now so the host solve overlaps the blocks on GPU.
            with torch.no_grad():
                t_all = torch.arange(self.num_timesteps, device=x.device)
                prior_target = self.prior.start_matching(self.all_gate_logits(self.t_embedder(t_all)))
        t_emb = self.t_embedder(t)
        t_bins = self.task_bins(t)
        t_index = t_bins
        if (self.routed and not self.training and not torch.is_grad_enabled() and t.numel() > 0
                and not torch.compiler.is_compiling()):  # compiled: the batched path, no host sync
            ts = t_bins.tolist()  # one host sync per step; lets routers use one mask row for a shared timestep
            if all(v == ts[0] for v in ts):
                t_index = int(ts[0])
        c = t_emb + self.y_embedder(y, self.training, force_drop_ids)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        block_aux = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h, a = checkpoint(block, h, c, t_index, t_emb, use_reentrant=False)
            else:
                h, a = block(h, c, t_index, t_emb)
            if a is not None:
                block_aux.append(a)
        out = self.unpatchify(self.final_layer(h, c))
        if use_prior:
            aux = self.lambda_dp * self.prior(prior_target, self.all_gate_logits(t_emb), t_bins)
        else:
            aux = torch.zeros((), device=x.device, dtype=torch.float32)
        if block_aux:  # the mixtures' load-balancing losses, summed over blocks as DiT-MoE
            aux = aux + torch.stack(block_aux).float().sum()
        return ModelOutput(sample=out, aux_loss=aux)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: int | None = None) -> ModelOutput:
        """Classifier-free guidance: the batch is [cond half; null-class half] with the same x in both halves.

        eps = eps_u + s * (eps_c - eps_u) on the first ``cfg_channels`` channels (None = all input channels;
        DiT's released code guides only 3 of its 4 latent channels).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        n = self.in_channels if cfg_channels is None else cfg_channels
        if not 0 < n <= self.in_channels:
            raise ValueError(f"cfg_channels must be in [1, {self.in_channels}], got {cfg_channels}")
        eps, rest = out.sample[:, :n], out.sample[:, n:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return ModelOutput(sample=torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1), aux_loss=out.aux_loss)


# name -> (depth, hidden size, heads). XS and Ti are small sizes for CPU work (not in the paper).
MODEL_SIZES = {
    "XS": (6, 192, 3),
    "Ti": (12, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
VARIANTS = (*ROUTERS, *MIXTURES)  # DiT, DTR, Switch-DiT (routing by timestep), TC-MoE, EC-MoE, DiffMoE (by token)
_NAME = re.compile(r"^(?P<variant>DiT|DTR|Switch-DiT|TC-MoE|EC-MoE|DiffMoE)-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def model_names() -> list[str]:
    return [f"{v}-{s}/{p}" for v in VARIANTS for s in MODEL_SIZES for p in PATCH_SIZES]


def parse_model_name(name: str) -> tuple[str, str, int]:
    m = _NAME.match(name)
    if not m or m["size"] not in MODEL_SIZES or int(m["patch"]) not in PATCH_SIZES:
        raise ValueError(f"unknown model name {name!r}: expected VARIANT-SIZE/PATCH with VARIANT in "
                         f"{list(VARIANTS)}, SIZE in {list(MODEL_SIZES)}, PATCH in {list(PATCH_SIZES)} (e.g. 'Switch-DiT-S/2')")
    return m["variant"], m["size"], int(m["patch"])


def create_model(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, *, class_dropout_prob: float = 0.1, num_experts: int = 3,
                 top_k: int = 2, lambda_dp: float = 1.0, prior_alpha: float = 4.0, prior_seed: int = 0,
                 mask_form: str = "one_plus", dtr_alpha: float = 4.0, dtr_beta: float = 0.8,
                 num_timesteps: int = 1000, grad_checkpointing: bool = False, moe_experts: int = 8,
                 moe_top_k: int = 2, moe_shared: int = 1, moe_capacity_factor: float = 1.25,
                 moe_aux_alpha: float = 0.01, moe_scope: str = "batch") -> DiT:
    """Build "DiT-S/2", "DTR-B/4", "Switch-DiT-XL/2", "TC-MoE-S/2", ...; options that do not apply to a variant
    are ignored.

    Token-routed variants (moe_*): E = moe_experts fine-grained experts per block, each a GELU FFN of width
    4D / (moe_top_k + moe_shared), plus moe_shared always-on ones; TC-MoE sends each token to its top
    moe_top_k (capacity moe_capacity_factor in training, load-balancing loss moe_aux_alpha), EC-MoE lets each
    expert take moe_top_k * tokens / E tokens of its pool (moe_scope: the batch or each sample), DiffMoE is
    batch-pool expert choice with a capacity predictor (loss weight moe_aux_alpha) that sets each expert's
    number of tokens in sampling."""
    variant, size, patch = parse_model_name(name)
    depth, hidden, heads = MODEL_SIZES[size]
    if input_size % patch:
        raise ValueError(f"input_size={input_size} is not divisible by the patch size {patch} of {name}; "
                         f"choose an input size that is a multiple of {patch}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (use 1 for unconditional data), got {num_classes}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    for option, value in (("num_experts", num_experts), ("top_k", top_k), ("moe_experts", moe_experts),
                          ("moe_top_k", moe_top_k), ("moe_shared", moe_shared)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{option} must be an integer, got {value!r}")
    if variant in MIXTURES and moe_experts < 1:
        raise ValueError(f"moe_experts must be >= 1, got {moe_experts}")
    router_factory, prior = None, None
    if variant == "Switch-DiT":
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts={num_experts}, got top_k={top_k}")
        if lambda_dp < 0:
            raise ValueError(f"lambda_dp must be >= 0, got {lambda_dp}")
        router_factory = lambda: SwitchRouter(hidden, num_experts, top_k, mask_form)  # noqa: E731
        prior = DiffusionPrior(depth, num_experts, top_k, num_timesteps, prior_alpha, prior_seed)
    elif variant == "DTR":
        DTRRouter(hidden, num_timesteps, dtr_alpha, dtr_beta)  # validates the options once
        router_factory = lambda: DTRRouter(hidden, num_timesteps, dtr_alpha, dtr_beta)  # noqa: E731
    mlp_factory = None
    if variant == "TC-MoE":
        mlp_factory = lambda: TokenChoiceMoE(hidden, moe_experts, moe_top_k, moe_shared,  # noqa: E731
                                             moe_capacity_factor, moe_aux_alpha)
    elif variant in ("EC-MoE", "DiffMoE"):
        if not 1 <= moe_top_k <= moe_experts:
            raise ValueError(f"moe_top_k must satisfy 1 <= moe_top_k <= moe_experts={moe_experts}, got {moe_top_k}")
        if variant == "EC-MoE":
            mlp_factory = lambda: ExpertChoiceMoE(hidden, moe_experts, float(moe_top_k), moe_shared,  # noqa: E731
                                                  moe_scope)
        else:
            mlp_factory = lambda: CapacityPredictorMoE(hidden, moe_experts, float(moe_top_k),  # noqa: E731
                                                       moe_shared, moe_aux_alpha)
    if mlp_factory is not None:
        mlp_factory()  # validates the options once, before the model is built
    return DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
               num_heads=heads, class_dropout_prob=class_dropout_prob, num_classes=num_classes,
               learn_sigma=learn_sigma, router_factory=router_factory, prior=prior, lambda_dp=lambda_dp,
               num_timesteps=num_timesteps, grad_checkpointing=grad_checkpointing, mlp_factory=mlp_factory)
