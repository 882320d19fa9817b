"""Models and loss weightings built from a Config: shared by train, sample, evaluate and compare (below all of them)."""
from __future__ import annotations

from .config import Config
from .diffusion import create_weighting
from .models import create_model
from .models.dit import DiT


def model_options(cfg: Config) -> dict:
    return dict(class_dropout_prob=cfg.class_dropout_prob, num_experts=cfg.num_experts, top_k=cfg.top_k,
                lambda_dp=cfg.lambda_dp, prior_alpha=cfg.prior_alpha, prior_seed=cfg.global_seed,
                mask_form=cfg.mask_form, dtr_alpha=cfg.dtr_alpha, dtr_beta=cfg.dtr_beta,
                num_timesteps=cfg.diffusion_steps, grad_checkpointing=cfg.grad_checkpointing,
                moe_experts=cfg.moe_experts, moe_top_k=cfg.moe_top_k, moe_shared=cfg.moe_shared,
                moe_capacity_factor=cfg.moe_capacity_factor, moe_aux_alpha=cfg.moe_aux_alpha, moe_scope=cfg.moe_scope)


def build_model(cfg: Config, in_channels: int, input_size: int, num_classes: int) -> DiT:
    # flow matching predicts a velocity only: no learned-variance channels
    return create_model(cfg.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                        learn_sigma=cfg.learn_sigma and cfg.objective == "ddpm", **model_options(cfg))


def build_weighting(cfg: Config):
    kwargs = {"min_snr": dict(gamma=cfg.min_snr_gamma), "p2": dict(k=cfg.p2_k, gamma=cfg.p2_gamma),
              "uw": dict(num_intervals=cfg.uw_intervals)}.get(cfg.loss_weighting, {})
    return create_weighting(cfg.loss_weighting, **kwargs)


__all__ = ["model_options", "build_model", "build_weighting"]
