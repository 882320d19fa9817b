import math

import numpy as np
import pytest
import torch

from switch_dit import create_model
from switch_dit.diffusion import (GaussianDiffusion, MinSNRWeighting, P2Weighting, UncertaintyWeighting,
                                  create_diffusion, create_weighting, get_named_beta_schedule, space_timesteps)
from switch_dit.diffusion.losses import approx_standard_normal_cdf
from switch_dit.models.dit import ModelOutput


def test_schedules():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert get_named_beta_schedule("linear", 500)[-1] == pytest.approx(0.04)
    cos = get_named_beta_schedule("cosine", 1000)
    ab = np.cumprod(1 - cos)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[499] == pytest.approx(f(0.5) / f(0), rel=1e-6)
    assert cos.max() <= 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("sigmoid", 10)


def test_q_sample_moments():
    d = create_diffusion()
    x0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t)
    ab = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_posterior_matches_bayes_closed_form():
    d = create_diffusion(noise_schedule="cosine")
    x0, xt = torch.randn(5, 3), torch.randn(5, 3)
    for step in (1, 10, 500, 999):
        t = torch.full((5,), step)
        mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
        beta, ab_prev = d.betas[step], d.alphas_cumprod[step - 1]
        prec = (1 - beta) / beta + 1 / (1 - ab_prev)  # product of q(x_t|x_{t-1}) and q(x_{t-1}|x_0)
        expect_mean = (math.sqrt(1 - beta) / beta * xt.double() + math.sqrt(ab_prev) / (1 - ab_prev) * x0.double()) / prec
        assert var.flatten()[0].item() == pytest.approx(1 / prec, rel=1e-5)
        assert torch.allclose(mean.double(), expect_mean, atol=1e-5)


def _const_model(eps_value, v_value):
    def model(x, t, **kw):
        return ModelOutput(torch.cat([torch.full_like(x, eps_value), torch.full_like(x, v_value)], 1), torch.zeros(()))
    return model


def test_vlb_term_by_hand():
    betas = np.array([0.1, 0.2, 0.3])
    d = GaussianDiffusion(betas, learn_sigma=True)
    x0 = torch.tensor([[[[0.5]]]])
    noise = torch.tensor([[[[-0.3]]]])
    eps_hat, v = 0.2, 0.4
    ab = np.cumprod(1 - betas)
    # t = 1: KL between the true posterior and the model's Gaussian, in bits.
    t = 1
    xt = math.sqrt(ab[t]) * 0.5 + math.sqrt(1 - ab[t]) * -0.3
    post_var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
    c1 = betas[t] * math.sqrt(ab[t - 1]) / (1 - ab[t])
    c2 = (1 - ab[t - 1]) * math.sqrt(1 - betas[t]) / (1 - ab[t])
    true_mean = c1 * 0.5 + c2 * xt
    x0_hat = (xt - math.sqrt(1 - ab[t]) * eps_hat) / math.sqrt(ab[t])
    model_mean = c1 * x0_hat + c2 * xt
    frac = (v + 1) / 2
    model_logvar = frac * math.log(betas[t]) + (1 - frac) * math.log(post_var)
    kl = 0.5 * (-1 + model_logvar - math.log(post_var) + post_var / math.exp(model_logvar)
                + (true_mean - model_mean) ** 2 / math.exp(model_logvar))
    out = d.training_losses(_const_model(eps_hat, v), x0, torch.tensor([t]), noise=noise)
    assert out["vb"].item() == pytest.approx(kl / math.log(2), rel=1e-4)
    assert out["mse"].item() == pytest.approx((eps_hat + 0.3) ** 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx((eps_hat + 0.3) ** 2 + kl / math.log(2), rel=1e-4)
    # t = 0: discretised Gaussian decoder NLL with the t = 1 posterior variance as clipped minimum.
    t = 0
    xt = math.sqrt(ab[0]) * 0.5 + math.sqrt(1 - ab[0]) * -0.3
    x0_hat = (xt - math.sqrt(1 - ab[0]) * eps_hat) / math.sqrt(ab[0])
    mean0 = x0_hat  # posterior coef2 is 0 and coef1 is 1 at t = 0
    logvar0 = frac * math.log(betas[0]) + (1 - frac) * math.log(post_var)
    inv = math.exp(-0.5 * logvar0)
    cdf = lambda z: float(approx_standard_normal_cdf(torch.tensor(z, dtype=torch.float64)))  # noqa: E731
    nll = -math.log(cdf(inv * (0.5 - mean0 + 1 / 255)) - cdf(inv * (0.5 - mean0 - 1 / 255)))
    out = d.training_losses(_const_model(eps_hat, v), x0, torch.tensor([0]), noise=noise)
    assert out["vb"].item() == pytest.approx(nll / math.log(2), rel=1e-3)


def test_vlb_trains_only_the_variance():
    d = create_diffusion()
    out_param = torch.zeros(2, 8, 4, 4, requires_grad=True)
    res = d.training_losses(lambda x, t: out_param, torch.randn(2, 4, 4, 4), torch.tensor([3, 600]))
    res["vb"].sum().backward()
    assert (out_param.grad[:, :4] == 0).all() and out_param.grad[:, 4:].abs().sum() > 0


def test_aux_loss_is_added_and_nothing_else():
    d = create_diffusion()
    x0, t, noise = torch.randn(2, 4, 4, 4), torch.tensor([3, 600]), torch.randn(2, 4, 4, 4)
    base = lambda x, t: ModelOutput(torch.zeros(2, 8, 4, 4), torch.tensor(0.0))  # noqa: E731
    with_aux = lambda x, t: ModelOutput(torch.zeros(2, 8, 4, 4), torch.tensor(0.25))  # noqa: E731
    a = d.training_losses(base, x0, t, noise=noise)["loss"]
    b = d.training_losses(with_aux, x0, t, noise=noise)["loss"]
    assert b.item() == pytest.approx(a.item() + 0.25, rel=1e-6)


def test_respacing():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    with pytest.raises(ValueError, match="exactly 999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section"):
        space_timesteps(100, "150")
    base = create_diffusion()
    sp = create_diffusion("ddim50")
    assert sp.num_timesteps == 50
    assert np.allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map])
    # The model is called with the original indices.
    seen = []
    sp.p_mean_variance(lambda x, t: (seen.append(t), torch.zeros(1, 2, 2, 2))[1], torch.zeros(1, 1, 2, 2), torch.tensor([49]))
    assert seen[0].item() == 980


def _tiny_model():
    torch.manual_seed(0)
    m = create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_deterministic_under_seed(sampler):
    model = _tiny_model()
    d = create_diffusion("10")
    y = torch.tensor([0, 1, 2, 0])
    loop = d.p_sample_loop if sampler == "ddpm" else lambda *a, **k: d.ddim_sample_loop(*a, eta=0.5, **k)

    def run(seed):
        return loop(model, (4, 1, 8, 8), model_kwargs=dict(y=y), generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Per-sample generators: the result does not depend on how the samples are batched.
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = loop(model, (4, 1, 8, 8), model_kwargs=dict(y=y), generator=gens([10, 11, 12, 13]))
    first = loop(model, (2, 1, 8, 8), model_kwargs=dict(y=y[:2]), generator=gens([10, 11]))
    second = loop(model, (2, 1, 8, 8), model_kwargs=dict(y=y[2:]), generator=gens([12, 13]))
    # equal up to float noise: other batch shapes take other GEMM blockings (relative 1e-7, grown by the sampler)
    assert torch.allclose(full, torch.cat([first, second]), rtol=1e-4, atol=1e-5 * float(full.abs().max()))


def test_ddim_with_oracle_eps_recovers_the_single_data_point():
    d = create_diffusion("ddim25", learn_sigma=False)
    target = torch.tensor([0.3, -0.8, 0.5]).reshape(1, 3, 1, 1)

    def oracle(x, t):  # the exact eps of a data set holding one point
        ab = torch.from_numpy(create_diffusion().alphas_cumprod)[t].float().reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    out = d.ddim_sample_loop(oracle, (2, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(2, 3, 1, 1), atol=1e-4)
    out = d.p_sample_loop(oracle, (2, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(2, 3, 1, 1), atol=1e-3)


def test_cfg_sampling_scale_one_equals_conditional_sampling():
    model = _tiny_model()
    d = create_diffusion("5")
    y = torch.tensor([0, 2])
    z = torch.randn(2, 1, 8, 8)
    cond = d.ddim_sample_loop(model, z.shape, noise=z, model_kwargs=dict(y=y))
    guided = d.ddim_sample_loop(model.forward_with_cfg, (4, 1, 8, 8), noise=torch.cat([z, z]),
                                model_kwargs=dict(y=torch.cat([y, torch.full_like(y, 3)]), cfg_scale=1.0))
    assert torch.allclose(guided[:2], cond, atol=1e-4)


def test_weightings_on_known_cases():
    t = torch.tensor([0, 1])
    snr = torch.tensor([1.0, 10.0])
    assert torch.allclose(MinSNRWeighting(5.0).weights(t, snr), torch.tensor([1.0, 0.5]))
    assert torch.allclose(P2Weighting(1.0, 1.0).weights(t, torch.tensor([1.0, 3.0])), torch.tensor([0.5, 0.25]))
    assert torch.allclose(P2Weighting(1.0, 0.5).weights(t, torch.tensor([3.0, 8.0])), torch.tensor([0.5, 1 / 3]))
    mse, vb = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5])
    assert create_weighting("constant").combine(mse, vb, t, snr, 1000).item() == pytest.approx(2.5)
    assert create_weighting("min_snr", gamma=5.0).combine(mse, vb, t, snr, 1000).item() == pytest.approx(
        (1.0 + 1.5) / 2 + 0.5)
    with pytest.raises(ValueError, match="loss_weighting"):
        create_weighting("snr")


def test_uncertainty_weighting():
    uw = UncertaintyWeighting(num_intervals=4)
    t = uw.sample_timesteps(10, 1000, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(uw.interval(t, 1000), minlength=4)
    assert counts.tolist() == [3, 3, 2, 2]
    assert ((t >= 0) & (t < 1000)).all()
    t = uw.sample_timesteps(4000, 10, "cpu")  # intervals of uneven size still stay inside their interval
    assert torch.equal(torch.bincount(uw.interval(t, 10), minlength=4), torch.full((4,), 1000))
    t = torch.tensor([0, 100, 300, 600, 900, 950])  # intervals 0, 0, 1, 2, 3, 3
    mse = torch.tensor([1.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    vb = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5, 0.5])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, math.log(2.0), 0.0, -1.0]))
    # As the authors' code: L_c = mean of (MSE + VLB) over interval c, divided by the 4 intervals.
    L = [3.0 / 4, 4.0 / 4, 7.0 / 4, 7.5 / 4]
    s = [0.0, math.log(2.0), 0.0, -1.0]
    expect = sum(0.5 * (math.exp(-sc) * lc + sc) for sc, lc in zip(s, L))
    loss = uw.combine(mse, vb, t, torch.ones(6), 1000)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    # the numbers by hand: 0.5*(0.75) + 0.5*(0.5 + ln 2) + 0.5*(1.75) + 0.5*(e * 1.875 - 1)
    assert loss.item() == pytest.approx(0.375 + 0.25 + 0.5 * math.log(2) + 0.875 + 0.5 * (math.e * 1.875 - 1), rel=1e-6)
    loss.backward()
    grad_expect = [0.5 * (1 - math.exp(-sc) * lc) for sc, lc in zip(s, L)]
    assert torch.allclose(uw.log_vars.grad, torch.tensor(grad_expect), atol=1e-6)
    # An interval absent from the batch contributes nothing (and gets no gradient).
    uw.log_vars.grad = None
    uw.combine(mse[:2], vb[:2], t[:2], torch.ones(2), 1000).backward()
    assert (uw.log_vars.grad[1:] == 0).all()


def test_training_losses_with_a_real_model_backprop():
    model = create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=3)
    d = create_diffusion()
    w = create_weighting("uw")
    x0 = torch.randn(8, 1, 8, 8)
    t = w.sample_timesteps(8, d.num_timesteps, "cpu")
    out = d.training_losses(model, x0, t, dict(y=torch.randint(0, 3, (8,))), weighting=w)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["aux"].item() > 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
