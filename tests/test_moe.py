"""Token-routed FFN mixtures (TC-MoE, EC-MoE): equal to straightforward loops, capacity and drops, the
load-balancing loss, batch (in)dependence, active parameters, and the training/sampling pipeline around them."""
import pytest
import torch

from switch_dit import create_model
from switch_dit.models.moe import (ExpertChoiceMoE, TokenChoiceMoE, reference_expert_choice,
                                   reference_token_choice)
from tests.helpers import TINY, load_state, run_cli


def _grads(module, x, y, g):
    return torch.autograd.grad((y * g).sum(), [x, *module.parameters()])


CASES = [
    ("token choice, dropless", lambda: TokenChoiceMoE(32, 8, 2, 1, capacity_factor=0), reference_token_choice),
    ("token choice, capacity never reached", lambda: TokenChoiceMoE(32, 6, 3, 2, capacity_factor=2.0),
     reference_token_choice),
    ("expert choice over the batch", lambda: ExpertChoiceMoE(32, 8, 2.0, 1, scope="batch"), reference_expert_choice),
    ("expert choice per sample", lambda: ExpertChoiceMoE(32, 4, 1.0, 0, scope="sample"), reference_expert_choice),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dispatch_equals_a_loop_over_experts_with_gradients(case, mode):
    torch.manual_seed(0)
    _, make, reference = case
    moe = getattr(make(), mode)()
    with torch.no_grad():
        moe.gate_weight.normal_(0, 1.0)  # decisive routing, so a wrong dispatch cannot hide in near-equal gates
    x = torch.randn(3, 16, 32, requires_grad=True)
    y, _ = moe(x)
    g = torch.randn_like(y)
    want = reference(moe, x)
    assert y.abs().mean() > 0.1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(moe, x, y, g), _grads(moe, x, want, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_token_choice_over_capacity_drops_second_choices_first_and_counts_them():
    moe = TokenChoiceMoE(8, 4, 2, 0, capacity_factor=1.0).train()
    with torch.no_grad():
        moe.gate_weight.zero_()
        moe.gate_weight[0, 0] = 10.0  # every token: first choice expert 0, second choice expert 1
        moe.gate_weight[1, 0] = 5.0
    x = torch.zeros(1, 8, 8)
    x[..., 0] = 1.0
    _, aux = moe(x)
    # 16 slots, capacity ceil(1 * 2 * 8 / 4) = 4 per expert: 4 first and 4 second choices kept
    tokens, kept, dropped, unrouted = moe.pop_stats().tolist()
    assert (tokens, kept, dropped, unrouted) == (8, 8, 8, 4)
    assert moe.pop_stats().sum() == 0  # popped
    # the same tokens in eval mode are dropless
    moe.eval()(x)
    assert moe.pop_stats().tolist() == [8, 16, 0, 0]


def test_load_balancing_loss_is_alpha_for_a_uniform_gate_and_larger_when_unbalanced():
    moe = TokenChoiceMoE(16, 8, 2, 1, aux_alpha=0.01).train()
    with torch.no_grad():
        moe.gate_weight.zero_()
    x = torch.randn(2, 16, 16)
    _, aux = moe(x)
    assert aux.item() == pytest.approx(0.01, rel=1e-6)  # sum_i f_i P_i = sum_i (E c_i / kT)(1 / E) = 1
    with torch.no_grad():
        moe.gate_weight[0] = 5.0
        moe.gate_weight[1] = 5.0
    _, aux = moe(torch.rand(2, 16, 16) + 1)
    assert aux.item() > 0.03
    assert moe.eval()(x)[1] is None  # no auxiliary loss outside training


def test_batch_dependence_is_as_documented():
    torch.manual_seed(0)
    x = torch.randn(6, 16, 32)
    tc = TokenChoiceMoE(32, 8, 2, 1).eval()  # dropless in eval: per token
    ec_sample = ExpertChoiceMoE(32, 8, 2.0, 1, scope="sample").eval()
    ec_batch = ExpertChoiceMoE(32, 8, 2.0, 1, scope="batch").eval()
    for moe in (tc, ec_sample, ec_batch):
        with torch.no_grad():
            moe.gate_weight.normal_(0, 1.0)
    for moe in (tc, ec_sample):
        torch.testing.assert_close(moe(x[:1])[0], moe(x)[0][:1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ec_batch(x[:1])[0], ec_batch(x)[0][:1], atol=1e-4)


@pytest.mark.parametrize("size", ["XS/4", "S/2", "XL/2"])
@pytest.mark.parametrize("variant", ["TC-MoE", "EC-MoE"])
def test_active_parameters_and_flops_within_5_percent_of_dense_dit(size, variant):
    from switch_dit.compare import active_parameters
    from switch_dit.config import Config
    from switch_dit.flops import forward_gflops

    dense = Config(model=f"DiT-{size}", image_size=32, objective="flow")
    moe = Config(model=f"{variant}-{size}", image_size=32, objective="flow")
    assert active_parameters(moe) == pytest.approx(active_parameters(dense), rel=0.05)
    with torch.device("meta"):
        total = sum(p.numel() for p in create_model(moe.model, input_size=32, in_channels=1, num_classes=10,
                                                    learn_sigma=False).parameters())
    assert total > 1.5 * active_parameters(moe)  # 8 experts of which 2 (+1 shared) act
    assert forward_gflops(moe.model, 32, 1) == pytest.approx(forward_gflops(dense.model, 32, 1), rel=0.05)


def test_options_are_checked():
    with pytest.raises(ValueError, match="moe_top_k"):
        create_model("TC-MoE-XS/4", input_size=8, in_channels=1, moe_experts=2, moe_top_k=3)
    with pytest.raises(ValueError, match="moe_scope"):
        create_model("EC-MoE-XS/4", input_size=8, in_channels=1, moe_scope="global")
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        create_model("TC-MoE-XS/4", input_size=8, in_channels=1, moe_capacity_factor=float("nan"))
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2", "--moe-top-k", "9", "--max-steps", 1) == 2


@pytest.mark.parametrize("model", ["TC-MoE-XS/2", "EC-MoE-XS/2"])
def test_resume_is_exact_and_every_sampler_runs(tmp_path, model):
    args = [*TINY, "--model", model, "--ckpt-every", 2]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", *args, "--max-steps", 4, "--results-dir", a) == 0
    assert run_cli("train", *args, "--max-steps", 2, "--results-dir", b) == 0
    assert run_cli("train", *args, "--max-steps", 4, "--results-dir", b, "--resume", "auto") == 0
    sa, sb = load_state(a / "checkpoints" / "step_0000004.pt"), load_state(b / "checkpoints" / "step_0000004.pt")
    for key in ("model", "ema"):
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)
    from switch_dit.integrations import read_metrics

    logged = read_metrics(a / "metrics.jsonl")[-1]
    assert "train/moe_dropped_slots" in logged and 0 <= logged["train/moe_dropped_slots"] <= 1
    assert ("train/balance_loss" in logged) == model.startswith("TC")
    for sampler in ("ddpm", "ddim", "dpm++"):
        out = tmp_path / f"{sampler}.png"
        assert run_cli("sample", a / "checkpoints" / "step_0000004.pt", "--sampler", sampler,
                       "--num-sampling-steps", 3, "--per-class", 1, "--out", out) == 0
        assert out.stat().st_size > 0


def test_flow_training_and_sampling(tmp_path):
    out = tmp_path / "flow"
    assert run_cli("train", *TINY, "--model", "EC-MoE-XS/2", "--objective", "flow", "--max-steps", 2,
                   "--ckpt-every", 2, "--results-dir", out) == 0
    for sampler in ("euler", "heun", "euler-maruyama"):
        assert run_cli("sample", out / "checkpoints" / "step_0000002.pt", "--sampler", sampler,
                       "--num-sampling-steps", 2, "--per-class", 1, "--out", tmp_path / f"{sampler}.png") == 0


def test_train_takes_a_variant_spec_as_its_model(tmp_path):
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2:moe_experts=4,moe_shared=0", "--max-steps", 1,
                   "--results-dir", out) == 0
    state = load_state(out / "checkpoints" / "step_0000001.pt")
    assert state["config"]["model"] == "TC-MoE-XS/2" and state["config"]["moe_experts"] == 4
    assert state["model"]["blocks.0.mlp.experts.w1"].shape[0] == 4
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2:moe_experts=4", "--moe-experts", 6, "--max-steps", 1,
                   "--results-dir", tmp_path / "x") == 2


def _ddp_worker(rank, world, port, out, model, scope):
    from switch_dit.config import Config
    from switch_dit.train import train
    from tests.helpers import dist_env

    dist_env(rank, world, port)
    train(Config(model=model, data="digits", image_size=8, global_batch_size=8, lr=1e-3, max_steps=3, ckpt_every=3,
                 log_every=1, tensorboard=False, results_dir=out, device="cpu", moe_scope=scope, objective="flow"),
          progress=False)


@pytest.mark.parametrize("model,scope", [("EC-MoE-XS/2", "sample"), ("TC-MoE-XS/2", "batch")])
def test_ddp(tmp_path, model, scope):
    """Two processes train both variants. Expert choice within each sample has no batch-level coupling, so two
    processes equal one; token choice's capacity and balance loss see each process's own batch (as every MoE
    trainer), so there the runs only agree roughly."""
    from switch_dit.config import Config
    from switch_dit.train import train
    from tests.helpers import run_processes

    train(Config(model=model, data="digits", image_size=8, global_batch_size=8, lr=1e-3, max_steps=3, ckpt_every=3,
                 log_every=1, tensorboard=False, results_dir=str(tmp_path / "one"), device="cpu", moe_scope=scope,
                 objective="flow"), progress=False)
    run_processes(_ddp_worker, 2, str(tmp_path / "two"), model, scope)
    a = load_state(tmp_path / "one" / "checkpoints" / "step_0000003.pt")["model"]
    b = load_state(tmp_path / "two" / "checkpoints" / "step_0000003.pt")["model"]
    if scope == "sample":
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    else:
        assert all(torch.isfinite(v).all() for v in b.values())
        moved = max((a[k] - b[k]).abs().max().item() for k in a)
        assert moved < 0.05  # three Adam steps of lr 1e-3 apart at most
