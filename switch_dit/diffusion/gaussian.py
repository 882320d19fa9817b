"""The Gaussian diffusion process of ADM / DiT: eps prediction with a learned variance range.

Knows nothing of experts: it adds the model output's ``aux_loss`` to its loss and nothing more.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .weighting import LossWeighting


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


_DEVICE_COPIES: dict = {}  # (id of a schedule array, device) -> (array, its tensor): one host-to-device copy each


def _on_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    key = (id(arr), str(device))
    hit = _DEVICE_COPIES.get(key)
    if hit is None or hit[0] is not arr:  # the array object is kept in the entry, so its id cannot be reused
        hit = (arr, torch.from_numpy(arr).to(device))
        _DEVICE_COPIES[key] = hit
    return hit[1]


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """arr[t] as float32 on t's device, broadcastable to shape. The schedule array is copied to the device once
    (cached), not at every call: on CUDA each copy would be a blocking host-to-device transfer."""
    out = _on_device(arr, t.device)[t].float()
    return out.reshape(-1, *([1] * (len(shape) - 1)))


def randn(shape, generator=None, device=None) -> torch.Tensor:
    """Gaussian noise; ``generator`` may be a list of one generator per sample, so each sample's noise is
    independent of how samples are batched (per-sample seeds)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=device)


def _unwrap(out):
    """Model outputs are ModelOutput (.sample, .aux_loss); plain tensors are accepted for convenience."""
    if hasattr(out, "sample"):
        return out.sample, getattr(out, "aux_loss", None)
    return out, None


class GaussianDiffusion:
    """A (possibly respaced) diffusion. ``use_timesteps`` keeps a subset of the base schedule's steps; the
    model is always called with the original timestep indices."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, sigma_small: bool = False,
                 use_timesteps: Sequence[int] | None = None):
        base_betas = np.asarray(betas, dtype=np.float64)
        if base_betas.ndim != 1 or (base_betas <= 0).any() or (base_betas > 1).any():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.base_num_timesteps = len(base_betas)
        base_ac = np.cumprod(1.0 - base_betas)
        if use_timesteps is None:
            use_timesteps = range(len(base_betas))
        kept = sorted(set(int(t) for t in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(base_betas):
            raise ValueError(f"respaced timesteps must lie in [0, {len(base_betas)})")
        # Respacing: new betas so that the kept steps have the same cumulative alphas as in the base process.
        last, new_betas = 1.0, []
        for i in kept:
            new_betas.append(1.0 - base_ac[i] / last)
            last = base_ac[i]
        self.timestep_map = np.array(kept, dtype=np.int64)
        self.betas = np.array(new_betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)

        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.snr_values = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, with the t = 0 entry (0) replaced by the t = 1 one.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if len(pv) > 1 else np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start, t):
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        var = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        return mean, var, torch.log(var)

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t.shape), _extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return _on_device(self.snr_values, t.device)[t].float()

    # ----------------------------------------------------------------- model
    def _call_model(self, model: Callable, x, t, model_kwargs):
        return model(x, _on_device(self.timestep_map, t.device)[t], **(model_kwargs or {}))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def _mean_variance_from_output(self, output, x, t, clip_denoised: bool):
        C = x.shape[1]
        output = output.float()
        if self.learn_sigma:
            if output.shape[1] != 2 * C:
                raise ValueError(f"a learned-sigma model must output {2 * C} channels, got {output.shape[1]}")
            eps, v = output[:, :C], output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (v + 1) / 2  # v in [-1, 1] interpolates log-variance between beta~_t and beta_t
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = output[:, :C]
            if self.sigma_small:
                variance_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:  # "fixed large": beta_t, with the posterior variance at t = 0 for a good likelihood
                variance_arr = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
                log_arr = np.log(variance_arr)
            variance, log_variance = _extract(variance_arr, t, x.shape), _extract(log_arr, t, x.shape)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model, x, t, clip_denoised: bool = False, model_kwargs=None):
        output, _ = _unwrap(self._call_model(model, x, t, model_kwargs))
        return self._mean_variance_from_output(output, x, t, clip_denoised)

    # ----------------------------------------------------------------- training
    def _vb_terms_bpd(self, output, x_start, x_t, t):
        """L_t in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._mean_variance_from_output(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None,
                        weighting: LossWeighting | None = None) -> dict:
        """Returns {"loss": scalar to minimise, "diffusion": its diffusion part, "mse", "vb": per-sample (B,),
        "aux": the model's aux_loss}. loss = weighting(mse, vb) + aux."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output, aux = _unwrap(self._call_model(model, x_t, t, model_kwargs))
        C = x_start.shape[1]
        output = output.float()
        eps = output[:, :C]
        mse = mean_flat((noise.float() - eps) ** 2)
        if self.learn_sigma:
            # The VLB term trains only the variance: the mean (eps) is detached.
            frozen = torch.cat([eps.detach(), output[:, C:]], dim=1)
            vb = self._vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
        else:
            vb = torch.zeros_like(mse)
        weighting = weighting or LossWeighting()
        diffusion_loss = weighting.combine(mse, vb, t, self.snr(t), self.num_timesteps)
        aux = torch.zeros((), device=x_start.device) if aux is None else aux.float()
        return {"loss": diffusion_loss + aux, "diffusion": diffusion_loss, "mse": mse, "vb": vb, "aux": aux}

    # ----------------------------------------------------------------- sampling
    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, generator=None):
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = randn(x.shape, generator, x.device)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))  # no noise at the last step
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, eta=0.0, generator=None):
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab = _extract(self.alphas_cumprod, t, x.shape)
        ab_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = out["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean + nonzero * sigma * randn(x.shape, generator, x.device) if eta > 0 else mean
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, clip_denoised, model_kwargs, device, progress, generator, **kw):
        device = device or (noise.device if noise is not None else "cpu")
        x = noise if noise is not None else randn(shape, generator, device)
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, generator=generator, **kw)["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                      progress=False, generator=None) -> torch.Tensor:
        """DDPM ancestral sampling with the (learned) variance over this diffusion's steps."""
        return self._loop(self.p_sample, model, shape, noise, clip_denoised, model_kwargs, device, progress, generator)

    def dpm_solver_pp_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                           progress=False) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al., 2022): the multistep second-order solver of the probability-flow ODE in
        data prediction, over this diffusion's timesteps (one model call each; respace with "linspaceN" for N
        calls, as ``switch-dit sample --sampler dpm++`` does).

        With lambda = log(alpha / sigma) and h = lambda_next - lambda_now, a step is
        x_next = (sigma_next / sigma_now) x - alpha_next (exp(-h) - 1) D, where D is the x0 prediction (first
        step: first order) or (1 + 1/2r) x0_now - 1/2r x0_prev with r = h_prev / h. The last step lands on
        clean data (alpha = 1, sigma = 0), where the update is x0 itself (first order, as 'lower order final').
        Only the eps channels of a learned-sigma model are used; deterministic given the initial noise.
        """
        device = device or (noise.device if noise is not None else "cpu")
        x = noise if noise is not None else randn(shape, None, device)
        C = x.shape[1]
        ab = self.alphas_cumprod
        alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
        lam = np.log(alpha) - np.log(sigma)
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        prev_x0, prev_lam = None, None
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out, _ = _unwrap(self._call_model(model, x, t, model_kwargs))
            eps = out[:, :C].float()
            x0 = (x.float() - sigma[i] * eps) / alpha[i]
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            if i == 0:
                return x0
            h = lam[i - 1] - lam[i]
            if prev_x0 is None:
                d = x0
            else:
                r = (lam[i] - prev_lam) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (sigma[i - 1] / sigma[i]) * x.float() + alpha[i - 1] * (-math.expm1(-h)) * d
            prev_x0, prev_lam = x0, lam[i]
        return x

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                         progress=False, generator=None, eta=0.0) -> torch.Tensor:
        """DDIM sampling (eta = 0: deterministic given the initial noise)."""
        return self._loop(self.ddim_sample, model, shape, noise, clip_denoised, model_kwargs, device, progress,
                          generator, eta=eta)
