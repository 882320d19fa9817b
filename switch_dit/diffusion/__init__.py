"""ADM-style Gaussian diffusion: schedules, losses and weightings, respacing, DDPM/DDIM samplers."""
from .gaussian import GaussianDiffusion, mean_flat, randn
from .schedules import betas_for_alpha_bar, get_named_beta_schedule, space_timesteps
from .weighting import (WEIGHTINGS, LossWeighting, MinSNRWeighting, P2Weighting, UncertaintyWeighting,
                        create_weighting)


def create_diffusion(timestep_respacing="", noise_schedule: str = "linear", learn_sigma: bool = True,
                     sigma_small: bool = False, diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The DiT diffusion: T = 1000, eps prediction, learned variance range; "" respacing for training,
    e.g. "250" (DDPM) or "ddim50" for sampling."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    return GaussianDiffusion(betas, learn_sigma=learn_sigma, sigma_small=sigma_small,
                             use_timesteps=space_timesteps(diffusion_steps, timestep_respacing))


__all__ = ["GaussianDiffusion", "create_diffusion", "get_named_beta_schedule", "betas_for_alpha_bar",
           "space_timesteps", "mean_flat", "randn", "WEIGHTINGS", "LossWeighting", "MinSNRWeighting",
           "P2Weighting", "UncertaintyWeighting", "create_weighting"]
