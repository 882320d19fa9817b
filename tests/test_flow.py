"""Flow matching: the loss, the samplers on Gaussian data with the closed-form optimal velocity, and the
training / sampling pipeline for flow checkpoints."""
import pytest
import torch

from switch_dit.flow import FlowMatching
from tests.test_samplers_gaussian import MU, N, S, _check


def optimal_velocity(x, t_in, **kwargs):
    """E[noise - x0 | x_t] for x0 ~ N(MU, S): -MU + (t I - (1 - t) S) S_t^-1 (x_t - (1 - t) MU),
    S_t = (1 - t)^2 S + t^2 I; the model sees 1000 t."""
    t = float(t_in[0]) / 1000.0
    eye = torch.eye(4, dtype=torch.float64)
    cov_t = (1 - t) ** 2 * S + t**2 * eye
    xf = x.reshape(len(x), 4).double()
    v = -MU + ((t * eye - (1 - t) * S) @ torch.linalg.solve(cov_t, (xf - (1 - t) * MU).T)).T
    return v.reshape(x.shape).float()


@pytest.mark.parametrize("sampler, steps", [("euler", 100), ("heun", 25), ("euler-maruyama", 250)])
def test_flow_sampler_reproduces_gaussian_data(sampler, steps):
    noise = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = FlowMatching().sample(optimal_velocity, noise, steps, sampler, generator=torch.Generator().manual_seed(2))
    _check(out)


def test_a_wrong_velocity_sign_is_caught():
    noise = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        _check(FlowMatching().sample(lambda x, t, **k: -optimal_velocity(x, t), noise, 25, "heun"))


def test_heun_is_second_order():
    noise = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    fm = FlowMatching()
    ref = fm.sample(optimal_velocity, noise, 1000, "heun")
    err = {n: (fm.sample(optimal_velocity, noise, n, "heun") - ref).abs().mean().item() for n in (10, 20, 40)}
    euler = {n: (fm.sample(optimal_velocity, noise, n, "euler") - ref).abs().mean().item() for n in (10, 20)}
    assert err[10] > err[20] > err[40] and err[20] / err[40] > 2.5 and err[20] < euler[20]


def test_loss_target_and_timestep_sampling():
    fm = FlowMatching("logit-normal")
    t = fm.sample_t(20000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01 and t.std().item() < 0.25
    assert abs(FlowMatching().sample_t(20000).std().item() - (1 / 12) ** 0.5) < 0.01
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def perfect(x_t, t_in, **kw):  # recovers the velocity from x_t when it knows x0
        seen["t"] = t_in
        tt = (t_in / 1000).reshape(-1, 1, 1, 1)
        assert torch.allclose(x_t, (1 - tt) * x0 + tt * noise)
        return noise - x0

    out = FlowMatching().training_losses(perfect, x0, t, noise=noise)
    assert torch.allclose(seen["t"], t * 1000) and out["loss"].item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="--loss-weighting min_snr applies to --objective ddpm"):
        from switch_dit.diffusion import create_weighting
        FlowMatching().training_losses(perfect, x0, t, noise=noise, weighting=create_weighting("min_snr"))


def test_flow_training_resume_sample_evaluate_analyze(tmp_path, capsys):
    import json

    from tests.helpers import TINY, load_state, run_cli

    args = [*TINY, "--objective", "flow", "--t-sampling", "logit-normal", "--ckpt-every", 2]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", *args, "--max-steps", 4, "--results-dir", a) == 0
    assert run_cli("train", *args, "--max-steps", 2, "--results-dir", b) == 0
    assert run_cli("train", *args, "--max-steps", 4, "--results-dir", b, "--resume", "auto") == 0
    sa, sb = load_state(a / "checkpoints" / "step_0000004.pt"), load_state(b / "checkpoints" / "step_0000004.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])  # exact resume
    assert sa["config"]["objective"] == "flow" and sa["config"]["sampler"] == "heun"
    assert sa["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 1  # velocity only: no variance channels
    assert sa["model"]["blocks.0.router.expert_weight"].abs().sum() > 0  # the experts and the prior trained
    ckpt = a / "checkpoints" / "step_0000004.pt"
    for sampler in ("euler", "heun", "euler-maruyama"):
        assert run_cli("sample", ckpt, "--sampler", sampler, "--num-sampling-steps", 3, "--per-class", 2,
                       "--out", tmp_path / f"{sampler}.png", "--no-progress") == 0
    assert run_cli("sample", "--ckpt", ckpt, "--num-fid-samples", 6, "--batch-size", 4, "--num-sampling-steps", 2,
                   "--out", tmp_path / "s.npz", "--no-progress") == 0
    capsys.readouterr()
    assert run_cli("sample", ckpt, "--sampler", "ddim", "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "--sampler ddim does not apply to this flow model: use one of euler, heun, euler-maruyama" in err
    assert run_cli("evaluate", "--ckpt", ckpt, "--num-samples", 20, "--num-sampling-steps", 2, "--ref-data", "digits",
                   "--ref-limit", 50, "--cache-dir", tmp_path, "--out", tmp_path / "r.json", "--no-progress") == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 20
    assert run_cli("analyze", ckpt, "--out", tmp_path / "an") == 0
    # a DDPM run cannot resume a flow checkpoint
    capsys.readouterr()
    assert run_cli("train", *TINY, "--objective", "ddpm", "--ckpt-every", 2, "--max-steps", 6, "--results-dir", a,
                   "--resume", "auto") == 2
    assert "objective: the run's 'flow' vs --objective 'ddpm'" in capsys.readouterr().err


def test_flow_routing_uses_task_bins_of_continuous_t():
    from switch_dit import create_model

    torch.manual_seed(0)
    model = create_model("DTR-XS/4", input_size=8, in_channels=1, num_classes=10, learn_sigma=False).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        # the DTR mask of t = 0.4567 is the one of bin 456; the embedding sees 456.7
        a = model(x, torch.tensor([456.7] * 3), y).sample
        blocks_masks = [b.router(x, model.task_bins(torch.tensor([456.7])), None) for b in model.blocks]
        ref_masks = [b.router(x, torch.tensor([456]), None) for b in model.blocks]
    assert all(torch.equal(m, r) for m, r in zip(blocks_masks, ref_masks))
    assert torch.isfinite(a).all()
