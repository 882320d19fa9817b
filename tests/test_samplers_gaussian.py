"""Every sampler on a problem with a known answer: for Gaussian data x0 ~ N(mu, S) the optimal noise
prediction is available in closed form, E[eps | x_t] = sigma_t (a_t^2 S + sigma_t^2 I)^-1 (x_t - a_t mu), so the
samples' mean and covariance must match mu and S up to sampling error (a sign or index error fails)."""
import numpy as np
import pytest
import torch

from switch_dit.diffusion import create_diffusion

N = 4000  # samples; the tolerances below are 5 standard errors at this size
MU = torch.tensor([0.8, -0.5, 0.3, 0.0], dtype=torch.float64)
L = torch.tensor([[0.6, 0.0, 0.0, 0.0], [0.3, 0.5, 0.0, 0.0], [-0.2, 0.1, 0.4, 0.0], [0.0, 0.2, 0.3, 0.7]],
                 dtype=torch.float64)
S = L @ L.T


def optimal_model(schedule: str):
    """A learned-sigma 'model' (eps and v channels) for data of shape (1, 2, 2) flattened to MU's 4 dims;
    v = -1 asks for the posterior variance beta~_t."""
    ab_all = torch.from_numpy(create_diffusion("", noise_schedule=schedule).alphas_cumprod)

    def model(x, t, **kwargs):
        ab = ab_all[t[0]]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        cov_t = ab * S + (1 - ab) * torch.eye(4, dtype=torch.float64)
        xf = x.reshape(len(x), 4).double()
        eps = s * torch.linalg.solve(cov_t, (xf - a * MU).T).T
        return torch.cat([eps.reshape(x.shape).float(), -torch.ones_like(x)], dim=1)

    return model


def _check(samples: torch.Tensor):
    x = samples.reshape(len(samples), 4).double()
    mean, cov = x.mean(0), torch.cov(x.T)
    se_mean = (S.diagonal() / N).sqrt()
    se_cov = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S**2) / N).sqrt()
    assert (mean - MU).abs().max() < 5 * se_mean.max(), (mean, MU)
    assert ((cov - S).abs() < 5 * se_cov).all(), (cov, S)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", "250"), ("ddim", "ddim50"), ("dpm++", "linspace20"),
                                            ("dpm++", "linspace50")])
def test_sampler_reproduces_gaussian_data(schedule, sampler, steps):
    d = create_diffusion(steps, noise_schedule=schedule)
    noise = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    model = optimal_model(schedule)
    if sampler == "ddpm":
        out = d.p_sample_loop(model, noise.shape, noise=noise, generator=gen)
    elif sampler == "ddim":
        out = d.ddim_sample_loop(model, noise.shape, noise=noise)
    else:
        out = d.dpm_solver_pp_loop(model, noise.shape, noise=noise)
    _check(out)


def test_a_wrong_sign_is_caught():
    """The check has teeth: flipping the sign of the noise prediction moves the samples far from the data."""
    d = create_diffusion("linspace20")
    model = optimal_model("linear")

    def flipped(x, t, **kw):
        out = model(x, t)
        return torch.cat([-out[:, :1], out[:, 1:]], dim=1)

    noise = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        _check(d.dpm_solver_pp_loop(flipped, noise.shape, noise=noise))


def test_dpm_solver_first_step_is_ddim():
    """With two model calls DPM-Solver++ is DDIM's first-order update followed by the clean-data step, and
    with more calls it differs from DDIM only by its second-order correction."""
    model = optimal_model("linear")
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    for spacing in ("2", "linspace2"):
        a = create_diffusion(spacing).dpm_solver_pp_loop(model, noise.shape, noise=noise)
        b = create_diffusion(spacing).ddim_sample_loop(model, noise.shape, noise=noise)
        assert torch.allclose(a, b, atol=1e-4)
    a = create_diffusion("linspace5").dpm_solver_pp_loop(model, noise.shape, noise=noise)
    b = create_diffusion("linspace5").ddim_sample_loop(model, noise.shape, noise=noise)
    assert not torch.allclose(a, b, atol=1e-3)


def test_dpm_solver_converges_to_the_ode_solution():
    """Second order: the error against a 1000-step solve shrinks about 4x when the steps double."""
    model = optimal_model("cosine")
    noise = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    ref = create_diffusion("", noise_schedule="cosine").dpm_solver_pp_loop(model, noise.shape, noise=noise)
    errs = [(create_diffusion(f"linspace{n}", noise_schedule="cosine").dpm_solver_pp_loop(
        model, noise.shape, noise=noise) - ref).abs().mean().item() for n in (25, 50, 100)]
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 2.5, errs


def test_dpm_solver_spacing_is_what_diffusers_calls_linspace():
    from diffusers import DPMSolverMultistepScheduler

    from switch_dit.diffusion.schedules import space_timesteps

    for n in (10, 20, 50):
        ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
        ref.set_timesteps(n)
        assert sorted(space_timesteps(1000, f"linspace{n}"), reverse=True) == ref.timesteps.tolist()
        trailing = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
        trailing.set_timesteps(n)
        assert trailing.timesteps.tolist() != ref.timesteps.tolist()  # the name would be wrong
