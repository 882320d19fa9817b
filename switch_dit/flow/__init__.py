"""Flow matching with the linear interpolant (rectified flow, as SiT / SD3): x_t = (1 - t) x0 + t * noise,
t in [0, 1] with t = 1 pure noise (the direction of DDPM's timestep index, so DTR's tables and the diffusion
prior keep their meaning: low t = low noise), velocity target noise - x0, no learned variance. The model sees
1000 * t: DiT's sinusoidal timestep embedder then works over the range it has under DDPM (integer t in [0, 1000)),
so the DDPM and flow runs share one architecture and Switch-DiT's gates read the same kind of embedding. (SiT
feeds t in [0, 1] unscaled to the same embedder; this code deliberately does not.)

Samplers integrate from t = 1 to t = 0 on a uniform grid: Euler and Heun for the probability-flow ODE
dx/dt = v(x, t), and Euler-Maruyama for the reverse SDE with diffusion g(t)^2 = 2t, whose drift
v - g^2 s / 2 = x + (2 - t) v stays finite at t = 0 (score s = -(x + (1 - t) v) / t for this interpolant).
"""
from __future__ import annotations

import torch

from ..diffusion.gaussian import _unwrap, mean_flat, randn

T_SAMPLINGS = ("uniform", "logit-normal")
FLOW_SAMPLERS = ("euler", "heun", "euler-maruyama")


class FlowMatching:
    """The training loss and the samplers of the linear-interpolant flow."""

    def __init__(self, t_sampling: str = "uniform"):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"--t-sampling must be one of {list(T_SAMPLINGS)}, got {t_sampling!r}")
        self.t_sampling = t_sampling

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times in [0, 1]: uniform, or logit-normal (mean 0, std 1) as SD3."""
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator)
        return torch.sigmoid(torch.randn(n, generator=generator))

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, weighting=None) -> dict:
        """The same dict as GaussianDiffusion.training_losses: loss = MSE(v, noise - x0) + the model's aux_loss."""
        if weighting is not None and weighting.name != "constant":
            raise ValueError(f"--loss-weighting {weighting.name} applies to --objective ddpm; flow matching "
                             "trains with the constant weighting")
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.interpolate(x_start, noise, t.to(x_start.dtype))
        output, aux = _unwrap(model(x_t, t * 1000.0, **(model_kwargs or {})))
        C = x_start.shape[1]
        mse = mean_flat((noise.float() - x_start.float() - output[:, :C].float()) ** 2)
        aux = torch.zeros((), device=x_start.device) if aux is None else aux.float()
        loss = mse.mean()
        return {"loss": loss + aux, "diffusion": loss, "mse": mse, "vb": torch.zeros_like(mse), "aux": aux}

    # ----------------------------------------------------------------- sampling
    @staticmethod
    def velocity(model, x, t: float, model_kwargs) -> torch.Tensor:
        tt = torch.full((x.shape[0],), 1000.0 * t, device=x.device)
        with torch.no_grad():
            out, _ = _unwrap(model(x, tt, **(model_kwargs or {})))
        return out[:, : x.shape[1]].float()

    def sample(self, model, noise: torch.Tensor, num_steps: int, sampler: str = "heun", model_kwargs=None,
               generator=None, progress: bool = False) -> torch.Tensor:
        """x at t = 0 from noise at t = 1 in num_steps uniform steps. Model calls: euler and euler-maruyama
        num_steps, heun 2 * num_steps - 1 (its last step, to t = 0, is an Euler step). The SDE's last step is
        deterministic (it lands on the denoised mean x - t v). ``generator`` may be a list of per-sample
        generators, as for the DDPM samplers."""
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"--sampler {sampler} does not apply to a flow-matching model: use one of "
                             f"{', '.join(FLOW_SAMPLERS)}")
        if num_steps < 1:
            raise ValueError(f"--num-sampling-steps must be >= 1, got {num_steps}")
        x = noise.float()
        grid = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
        steps = range(num_steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        for i in steps:
            t, t_next = grid[i], grid[i + 1]
            dt = t - t_next
            v = self.velocity(model, x, t, model_kwargs)
            if sampler == "euler-maruyama" and t_next > 0:
                drift = x + (2.0 - t) * v  # v - g^2 s / 2 with g^2 = 2t
                z = randn(x.shape, generator, x.device)
                x = x - dt * drift + (2.0 * t * dt) ** 0.5 * z
            elif sampler == "heun" and t_next > 0:
                x_pred = x - dt * v
                v_next = self.velocity(model, x_pred, t_next, model_kwargs)
                x = x - dt * 0.5 * (v + v_next)
            else:
                x = x - dt * v
        return x


__all__ = ["FlowMatching", "FLOW_SAMPLERS", "T_SAMPLINGS"]
