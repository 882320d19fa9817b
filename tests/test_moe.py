"""Token-routed FFN mixtures (TC-MoE, EC-MoE): equal to straightforward loops, capacity and drops, the
load-balancing loss, batch (in)dependence, active parameters, and the training/sampling pipeline around them."""
import warnings

import pytest
import torch

from switch_dit import create_model
from switch_dit.models.moe import (CapacityPredictorMoE, calibrate_thresholds, ExpertChoiceMoE, TokenChoiceMoE, reference_expert_choice,
                                   reference_predicted_capacity, reference_token_choice)
from tests.helpers import TINY, load_state, run_cli


def _grads(module, x, y, g):
    return torch.autograd.grad((y * g).sum(), [x, *module.parameters()])


def _static(moe):
    moe.static_dispatch = True  # the fixed-buffer dispatch torch.compile traces, run eagerly
    return moe


CASES = [
    ("token choice, dropless", lambda: TokenChoiceMoE(32, 8, 2, 1, capacity_factor=0), reference_token_choice),
    ("token choice, dropless, static buffers", lambda: _static(TokenChoiceMoE(32, 8, 2, 1, capacity_factor=0)),
     reference_token_choice),
    ("token choice, over capacity in training, static buffers",
     lambda: _static(TokenChoiceMoE(32, 8, 2, 1, capacity_factor=1.0)), reference_token_choice),
    ("token choice, capacity never reached", lambda: TokenChoiceMoE(32, 6, 3, 2, capacity_factor=2.0),
     reference_token_choice),
    ("token choice, over capacity in training", lambda: TokenChoiceMoE(32, 8, 2, 1, capacity_factor=1.0),
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
    if "over capacity" in case[0] and mode == "train":
        assert moe.pop_stats()[2] > 0  # the case exercises dropping
    g = torch.randn_like(y)
    want = reference(moe, x)
    assert y.abs().mean() > 0.1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(moe, x, y, g), _grads(moe, x, want, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["exact", "static buffers"])
def test_token_choice_over_capacity_drops_second_choices_first_and_counts_them(static):
    torch.manual_seed(0)
    moe = TokenChoiceMoE(8, 4, 2, 0, capacity_factor=1.0).train()
    moe.static_dispatch = static
    with torch.no_grad():
        moe.gate_weight.zero_()
        # tokens 0-3 (feature 0): first choice expert 1, second expert 0; tokens 4-7 (feature 1): first choice
        # expert 0, second expert 2. Expert 0 gets 8 slots for a capacity of ceil(1 * 2 * 8 / 4) = 4: choice-major
        # priority keeps tokens 4-7's first choices and drops tokens 0-3's second (token-major order would not)
        moe.gate_weight[1, 0], moe.gate_weight[0, 0] = 10.0, 5.0
        moe.gate_weight[0, 1], moe.gate_weight[2, 1] = 10.0, 5.0
    x = torch.zeros(1, 8, 8)
    x[0, :4, 0] = 1.0
    x[0, 4:, 1] = 1.0
    x[..., 2:] = 0.1 * torch.randn(1, 8, 6)
    y, _ = moe(x)
    tokens, kept, dropped, unrouted = moe.pop_stats().tolist()
    assert (tokens, kept, dropped, unrouted) == (8, 12, 4, 0)
    assert moe.pop_stats().sum() == 0  # popped
    with torch.no_grad():
        p = moe.gate_probs(x[0])
        ref = moe.experts.reference
        want = torch.stack([p[t, 1] * ref(x[0, t:t + 1], 1)[0] for t in range(4)] +
                           [p[t, 0] * ref(x[0, t:t + 1], 0)[0] + p[t, 2] * ref(x[0, t:t + 1], 2)[0]
                            for t in range(4, 8)])
        torch.testing.assert_close(y[0], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, reference_token_choice(moe, x), rtol=1e-5, atol=1e-6)
        # the same tokens in eval mode are dropless: tokens 0-3 get expert 0 back
        y_eval, _ = moe.eval()(x)
    assert moe.pop_stats().tolist() == [8, 16, 0, 0]
    assert not torch.allclose(y_eval[0, :4], y[0, :4]) and torch.allclose(y_eval[0, 4:], y[0, 4:])


def _expert_slots_computed(moe, x):
    """Token slots the routed experts computed in one forward, from torch's FLOP count (each: two D x H matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    T, D, H, E = x.shape[0] * x.shape[1], x.shape[2], moe.expert_hidden, moe.num_experts
    with FlopCounterMode(display=False) as counter:
        moe(x.detach())
    fixed = 2 * T * D * E + 2 * (2 * T * D * H)  # FLOPs (2 per multiply-accumulate) of the gate and shared expert
    slots, rest = divmod(counter.get_total_flops() - fixed, 2 * (2 * D * H))
    assert rest == 0
    return slots


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("eager", ["loop", "buffers"])
def test_the_token_choice_dispatches_agree_and_the_eager_ones_compute_what_they_say(mode, eager, monkeypatch):
    """Eager dispatch (a loop over experts on exactly their kept slots, or buffers as long as the busiest expert's
    group) and the fixed buffers torch.compile runs give the same outputs, gradients, counters and recorded
    assignment, also with drops and with an expert no token chooses. The loop computes the routed slots and no
    more, the eager buffers E x the busiest expert's slots, the fixed ones E x the capacity (dropless in eval:
    every token for every expert)."""
    from switch_dit.models import moe as moe_module

    monkeypatch.setattr(moe_module, "LOOP_ROWS", 0 if eager == "loop" else 10 ** 9)
    monkeypatch.setattr(moe_module, "PAD_LIMIT", float("inf"))
    torch.manual_seed(0)
    D, E, k, T = 32, 8, 2, 48
    exact = getattr(TokenChoiceMoE(D, E, k, 1, capacity_factor=1.0), mode)()
    static = _static(getattr(TokenChoiceMoE(D, E, k, 1, capacity_factor=1.0), mode)())
    with torch.no_grad():
        exact.gate_weight.normal_(0, 1.0)
        exact.gate_weight[3] = -1e3  # expert 3: chosen by no token (x > 0 below)
    static.load_state_dict(exact.state_dict())
    x = torch.rand(3, T // 3, D, requires_grad=True)
    g = torch.randn(3, T // 3, D)
    exact.record = static.record = True
    outs = [m(x)[0] for m in (exact, static)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    grads = [_grads(exact, x, outs[0], g), _grads(static, x, outs[1], g)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert grads[0][2][3].abs().sum() == 0 and grads[0][2].abs().sum() > 0  # w1: expert 3's gradient is zero
    stats = [m.pop_stats() for m in (exact, static)]
    assert torch.equal(stats[0], stats[1]) and (stats[0][2] > 0) == (mode == "train")  # drops in training only
    assert torch.equal(exact.last_assign, static.last_assign) and exact.last_assign[:, 3].sum() == 0

    per_expert = exact.last_assign.sum(0)  # kept slots of each expert
    assert _expert_slots_computed(static, x) == E * exact.capacity(T)
    want = per_expert.sum() if eager == "loop" else E * per_expert.max()
    assert _expert_slots_computed(exact, x) == want <= E * exact.capacity(T)
    assert want < E * exact.capacity(T) or (eager == "buffers" and mode == "train")  # (an expert full at capacity)


def test_eager_token_choice_pads_small_balanced_groups_and_loops_otherwise():
    """The automatic choice: buffers as long as the busiest group while groups are small and that pads at most
    PAD_LIMIT, otherwise the loop over exactly the routed slots."""
    from switch_dit.models.moe import LOOP_ROWS, PAD_LIMIT

    torch.manual_seed(0)
    D, E = 16, 8

    def nearly_balanced(n):
        """n tokens: token t's first choice is expert t % 8, its second (t + 1) % 8, but token 0's second is 2."""
        x = 0.01 * torch.randn(1, n, D)
        for t in range(n):
            x[0, t, t % E], x[0, t, (t + 1) % E] = 2.0, 1.0
        x[0, 0, 1], x[0, 0, 2] = 0.0, 1.0
        return x

    moe = TokenChoiceMoE(D, E, 2, 1).eval()  # dropless
    with torch.no_grad():
        moe.gate_weight.zero_()
        moe.gate_weight[:, :E] = 3.0 * torch.eye(E)
    moe.record = True
    for n, loop in ((128, False), (LOOP_ROWS * E // 2, True)):  # k = 2: 32, then LOOP_ROWS slots an expert
        x = nearly_balanced(n)
        moe(x)
        groups = moe.last_assign.sum(0)
        assert E * groups.max() <= PAD_LIMIT * groups.sum() and groups.max() > groups.min()  # padding is small
        assert (groups.sum() >= LOOP_ROWS * E) == loop
        assert _expert_slots_computed(moe, x) == (groups.sum() if loop else E * groups.max())
    with torch.no_grad():
        moe.gate_weight[0, :E] = 10.0  # every token's first choice: expert 0
    x = nearly_balanced(128)
    moe(x)
    groups = moe.last_assign.sum(0)
    assert E * groups.max() > PAD_LIMIT * groups.sum()  # small groups, but too uneven to pad: the loop
    assert _expert_slots_computed(moe, x) == groups.sum()


def test_diffmoe_trains_as_batch_expert_choice_with_its_predictor_loss_and_thresholds():
    """Training: the output is batch-scope expert choice's, the aux loss is alpha x the mean binary cross-entropy
    of the predictor against which experts picked each token, it trains the predictor only (detached tokens), and
    each threshold moves by (1 - 0.95) towards the C-th highest predicted probability of its expert."""
    torch.manual_seed(0)
    D, E = 16, 4
    moe = CapacityPredictorMoE(D, E, 2.0, 1, aux_alpha=0.01).train()
    ec = ExpertChoiceMoE(D, E, 2.0, 1, scope="batch").train()
    ec.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith(("predictor", "threshold"))})
    with torch.no_grad():
        moe.threshold.fill_(0.3)
    x = torch.randn(2, 8, D, requires_grad=True)
    y, aux = moe(x)
    torch.testing.assert_close(y, ec(x)[0], rtol=0, atol=0)
    xt = x.detach().reshape(-1, D)
    T, C = xt.shape[0], ec.capacity(16)
    probs = ec.gate_probs(xt)
    picked = torch.zeros(T, E)
    for e in range(E):
        picked[probs[:, e].topk(C).indices, e] = 1.0
    logits = moe.predictor(xt)
    p = torch.sigmoid(logits)
    bce = -(picked * torch.log(p) + (1 - picked) * torch.log(1 - p)).mean()
    assert aux.item() == pytest.approx(0.01 * bce.item(), rel=1e-5)
    quantile = p.sort(dim=0, descending=True).values[C - 1]
    torch.testing.assert_close(moe.threshold, 0.95 * 0.3 + 0.05 * quantile.detach(), rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad(aux, [x, moe.predictor[0].weight, moe.gate_weight], allow_unused=True)
    assert grads[0] is None or grads[0].abs().sum() == 0  # the predictor sees detached tokens
    assert grads[1].abs().sum() > 0 and (grads[2] is None or grads[2].abs().sum() == 0)


def test_a_diffmoe_threshold_starts_at_its_first_quantile():
    """A fresh threshold (0) is set to the first batch's C-th predicted probability, not 5% of it: an untrained or
    briefly trained model does not send every token to every expert."""
    torch.manual_seed(0)
    moe = CapacityPredictorMoE(16, 4, 2.0, 1).train()
    x = torch.randn(2, 8, 16)
    moe(x)
    p = torch.sigmoid(moe.predictor(x.reshape(-1, 16))).detach()
    torch.testing.assert_close(moe.threshold, p.sort(dim=0, descending=True).values[moe.capacity(16) - 1])


def test_calibration_fits_the_thresholds_to_the_models_own_predictor_and_changes_nothing_else():
    """calibrate_thresholds: each threshold becomes the model's own C-th highest predicted probability on the batch
    routed as in training (no EMA lag); no counters move, no random numbers are drawn, the mode is restored; a model
    without DiffMoE layers is left alone."""
    torch.manual_seed(0)
    model = create_model("DiffMoE-XS/4", input_size=8, in_channels=1, num_classes=10).train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 250, 600, 999]), torch.tensor([0, 1, 2, 3])
    inputs, quantiles = [], []
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())) for m in model.mixtures]
    with torch.no_grad():
        model.eval()  # the reference: training routing, eval-mode label embedding (no dropout)
        for m in model.mixtures:
            m.calibrating = True
        model(x, t, y)
        for m in model.mixtures:
            m.calibrating = False
    for h in hooks:
        h.remove()
    for m, h in zip(model.mixtures, inputs):
        p = torch.sigmoid(m.predictor(h.reshape(-1, h.shape[-1])))
        quantiles.append(p.sort(dim=0, descending=True).values[m.capacity(h.shape[0] * h.shape[1]) - 1])
    for m in model.mixtures:
        m.threshold.fill_(0.9)
        m.pop_stats()
    model.train()
    state = torch.random.get_rng_state()
    assert calibrate_thresholds(model, lambda m: m(x, t, y))
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    for m, q in zip(model.mixtures, quantiles):
        torch.testing.assert_close(m.threshold, q, rtol=1e-6, atol=1e-7)
        assert m.pop_stats().sum() == 0 and not m.calibrating
    dit = create_model("DiT-XS/4", input_size=8, in_channels=1, num_classes=10)
    assert not calibrate_thresholds(dit, lambda m: pytest.fail("ran a model without thresholds"))


def test_the_ema_model_samples_with_thresholds_fitted_to_its_own_predictor(tmp_path):
    """With a long EMA horizon the EMA's predictor is far from the model's: thresholds copied from the model would
    send each token to about 4 of 8 experts instead of 2. The trainer calibrates the EMA's thresholds before each
    checkpoint, so the checkpoint's EMA routes about moe_capacity_factor experts per token."""
    from switch_dit.config import Config
    from switch_dit.train import train

    cfg = Config(model="DiffMoE-XS/2", data="digits", image_size=8, global_batch_size=16, lr=1e-3, max_steps=40,
                 ckpt_every=40, log_every=10, tensorboard=False, results_dir=str(tmp_path), device="cpu",
                 objective="flow", ema_decay=0.9999, ema_warmup=False)
    out = train(cfg, progress=False)
    model, ema = out["model"].eval(), out["ema"].eval()
    state = load_state(tmp_path / "checkpoints" / "step_0000040.pt")
    ema_thr = torch.stack([v for k, v in state["ema"].items() if k.endswith(".mlp.threshold")])
    model_thr = torch.stack([v for k, v in state["model"].items() if k.endswith(".mlp.threshold")])
    torch.testing.assert_close(ema_thr, torch.stack([m.threshold for m in ema.mixtures]))
    assert (ema_thr - model_thr).abs().max() > 0.05  # fitted to another predictor

    def routed(net, thresholds=None):
        if thresholds is not None:
            for m, thr in zip(net.mixtures, thresholds):
                m.threshold.copy_(thr)
        torch.manual_seed(5)
        x0 = torch.randn(32, 1, 8, 8)
        for m in net.mixtures:
            m.pop_stats()
        with torch.no_grad():
            net(x0, torch.rand(32) * 1000, torch.randint(0, 10, (32,)))
        s = torch.stack([m.pop_stats() for m in net.mixtures]).sum(0)
        return (s[1] / s[0]).item()

    assert abs(routed(ema) - 2.0) < 0.5 and abs(routed(model) - 2.0) < 0.5
    assert routed(ema, model_thr) > 3.0  # what the copied thresholds did


@pytest.mark.parametrize("name", ["TC-MoE-XS/4", "EC-MoE-XS/4", "DiffMoE-XS/4"])
def test_counters_and_thresholds_move_once_a_step_with_activation_checkpointing(name):
    """Checkpointing recomputes a block's forward during backward: the routing counters (logged fractions) and
    DiffMoE's thresholds must not move a second time."""
    seen = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model(name, input_size=8, in_channels=1, num_classes=10,
                             grad_checkpointing=checkpointing).train()
        torch.manual_seed(1)
        out = model(torch.randn(4, 1, 8, 8), torch.tensor([3, 250, 600, 999]), torch.tensor([0, 1, 2, 3]))
        (out.sample.square().mean() + out.aux_loss).backward()
        seen.append([torch.cat([m.pop_stats(), getattr(m, "threshold", torch.zeros(0))]) for m in model.mixtures])
    assert seen[0][0][0] == 4 * 4  # tokens counted once
    if name.startswith("DiffMoE"):
        assert min(s[4:].min() for s in seen[0]) > 0
    for a, b in zip(*seen):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static shapes"])
def test_diffmoe_samples_each_expert_on_as_many_tokens_as_its_predictor_says(static):
    """Eval: expert e takes the k_e tokens of highest affinity, k_e = the tokens predicted above its threshold; the
    eager dispatch and the static one (torch.compile's: every expert on every token, weight 0 off the picks) equal
    a loop, with gradients, and the counters and recorded assignment say what was picked."""
    torch.manual_seed(0)
    D, E = 16, 4
    moe = CapacityPredictorMoE(D, E, 2.0, 1).eval()
    moe.static_dispatch = static
    x = torch.randn(2, 8, D, requires_grad=True)
    with torch.no_grad():
        moe.gate_weight.normal_(0, 1.0)
        p = torch.sigmoid(moe.predict(x.reshape(-1, D)))
        # experts 0-2 above the 10%, 50% and 80% quantile of their predictions (14, 8 and 3 of 16 tokens); 3: none
        moe.threshold.copy_(torch.stack([p[:, e].quantile(q) for e, q in enumerate((0.1, 0.5, 0.8))] +
                                        [torch.tensor(1.0)]))
    moe.record = True
    y, aux = moe(x)
    assert aux is None
    want = reference_predicted_capacity(moe, x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    wrt = [x, moe.gate_weight, *moe.experts.parameters(), *moe.shared.parameters()]  # (the predictor only counts)
    for a, b in zip(torch.autograd.grad((y * g).sum(), wrt), torch.autograd.grad((want * g).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    predicted = torch.sigmoid(moe.predict(x.detach().reshape(-1, D)))
    k = (predicted > moe.threshold).sum(0)
    assert k[3] == 0 and k[:3].min() > 0 and torch.equal(moe.last_assign.sum(0), k.float())
    tokens, computed, _, unrouted = moe.pop_stats().tolist()
    assert tokens == 16 and computed == (E * 16 if static else k.sum())
    assert unrouted == (moe.last_assign.sum(1) == 0).sum()


def test_load_balancing_loss_equals_its_formula_and_trains_the_gate():
    torch.manual_seed(0)
    E, k, alpha = 8, 2, 0.01
    moe = TokenChoiceMoE(16, E, k, 1, aux_alpha=alpha).train()
    with torch.no_grad():
        moe.gate_weight.zero_()
    x = torch.randn(2, 16, 16)
    _, aux = moe(x)
    assert aux.item() == pytest.approx(alpha, rel=1e-6)  # uniform gate: sum_i (E c_i / kT)(1 / E) = 1
    with torch.no_grad():
        moe.gate_weight.normal_(0, 2.0)  # unbalanced: some experts chosen far more often
    _, aux = moe(x)
    # alpha * sum_i f_i P_i, f_i = E / (k T) * (slots choosing i), P_i = mean gate probability, written as loops
    probs = moe.gate_probs(x.reshape(-1, 16)).detach()
    T = probs.shape[0]
    chosen = [0] * E
    for t in range(T):
        for e in probs[t].topk(k).indices.tolist():
            chosen[e] += 1
    want = alpha * sum(E / (k * T) * chosen[e] * probs[:, e].mean().item() for e in range(E))
    assert aux.item() == pytest.approx(want, rel=1e-5)
    assert aux.item() > 1.05 * alpha  # above its balanced minimum
    aux.backward()
    assert moe.gate_weight.grad is not None and moe.gate_weight.grad.abs().sum() > 0  # the loss reaches the gate
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


def test_costs_of_samples_with_few_tokens_count_the_routed_experts_a_token_gets():
    """One token a sample (patch 8 on 8x8): counted on one sample, every expert's buffer would round up to a whole
    token, 8 experts per token instead of 2. The FLOPs are counted on a batch whose shares are whole, and sample-scope
    expert choice refuses a capacity that is not a whole number of tokens."""
    from switch_dit.flops import forward_gflops

    dense = forward_gflops("DiT-XS/8", 8, 1)
    for variant in ("TC-MoE", "EC-MoE", "DiffMoE"):
        got = forward_gflops(f"{variant}-XS/8", 8, 1)
        assert dense < got < dense * (1.25 if variant == "DiffMoE" else 1.02), variant  # (+ gate, + predictor)
    from switch_dit.config import Config
    from switch_dit.train import preflight

    with pytest.raises(ValueError, match=r"moe_top_k x tokens per sample / moe_experts = 1 x 4 / 8 tokens, not a "
                                         r"whole number; use moe_top_k in \[2, 4, 6, 8\]"):
        preflight(Config(model="EC-MoE-XS/4", data="digits", image_size=8, moe_scope="sample", moe_top_k=1))
    preflight(Config(model="EC-MoE-XS/4", data="digits", image_size=8, moe_scope="sample", moe_top_k=2))
    preflight(Config(model="EC-MoE-XS/4", data="digits", image_size=8, moe_top_k=1))  # batch pools: averaged
    # refused for training only: a model trained so earlier still builds, so its checkpoints load
    create_model("EC-MoE-XS/4", input_size=8, in_channels=1, num_classes=10, moe_scope="sample", moe_top_k=1)


def test_diffmoe_costs_expert_choice_plus_its_capacity_predictor():
    """DiffMoE is batch-pool expert choice plus a D -> D -> E predictor on every token: its active parameters and
    FLOPs are EC-MoE's plus exactly the predictor's."""
    from switch_dit.compare import active_parameters
    from switch_dit.config import Config
    from switch_dit.flops import forward_gflops

    D, E, depth, tokens = 192, 8, 6, 16
    predictor = D * D + D + D * E + E
    assert active_parameters(Config(model="DiffMoE-XS/4")) == active_parameters(Config(model="EC-MoE-XS/4")) + \
        depth * predictor
    macs = depth * tokens * (D * D + D * E) / 1e9
    assert forward_gflops("DiffMoE-XS/4", 16, 1) == pytest.approx(forward_gflops("EC-MoE-XS/4", 16, 1) + macs, rel=1e-9)


def test_a_recorded_config_with_an_ignored_option_still_loads_and_resumes():
    """Runs recorded before ignored options were refused: the options are reset to their defaults when read (they
    never changed the weights), so loading, resuming and the compatibility check accept them."""
    from dataclasses import asdict

    from switch_dit.config import Config, _checked_record, config_from_dict
    from switch_dit.train import check_compatible
    from switch_dit.checkpoint import FORMAT

    old = {**asdict(Config(model="EC-MoE-XS/4")), "moe_aux_alpha": 0.0, "moe_capacity_factor": 2.0}
    cfg = config_from_dict(old).validate()
    assert (cfg.moe_aux_alpha, cfg.moe_capacity_factor) == (0.01, 1.25)
    assert _checked_record(old, "run/config.yaml")["moe_aux_alpha"] == 0.01
    check_compatible({"format": FORMAT, "config": old}, Config(model="EC-MoE-XS/4"), "x.pt")
    tc = {**asdict(Config(model="TC-MoE-XS/4")), "moe_scope": "sample"}
    assert config_from_dict(tc).validate().moe_scope == "batch"


def test_an_option_the_routing_ignores_is_refused():
    from switch_dit.config import Config

    with pytest.raises(ValueError, match="moe-capacity-factor applies to TC-MoE only.*EC-MoE's capacity factor.*"
                                         "--moe-top-k"):
        Config(model="EC-MoE-XS/4", moe_capacity_factor=2.0).validate()
    with pytest.raises(ValueError, match="moe-aux-alpha applies to TC-MoE and DiffMoE only"):
        Config(model="EC-MoE-XS/4", moe_aux_alpha=0.1).validate()
    with pytest.raises(ValueError, match="moe-scope applies to EC-MoE only"):
        Config(model="TC-MoE-XS/4", moe_scope="sample").validate()
    with pytest.raises(ValueError, match="moe-scope applies to EC-MoE only.*DiffMoE's pool is always the batch"):
        Config(model="DiffMoE-XS/4", moe_scope="sample").validate()
    with pytest.raises(ValueError, match="moe-capacity-factor applies to TC-MoE only.*DiffMoE's capacity factor"):
        Config(model="DiffMoE-XS/4", moe_capacity_factor=2.0).validate()
    Config(model="EC-MoE-XS/4", moe_scope="sample", moe_top_k=3).validate()
    Config(model="DiffMoE-XS/4", moe_aux_alpha=0.1, moe_top_k=3).validate()
    with pytest.raises(ValueError, match="capacity predictor's loss weight"):
        create_model("DiffMoE-XS/4", input_size=8, in_channels=1, moe_aux_alpha=-1.0)
    with pytest.raises(ValueError, match="moe-aux-alpha must be > 0 for DiffMoE"):
        Config(model="DiffMoE-XS/4", moe_aux_alpha=0.0).validate()
    # every variant refuses the options of the others' routing (Switch-DiT's, DTR's, the mixtures')
    for model, option, value, owner in [("DiffMoE-XS/4", "num_experts", 5, "Switch-DiT"),
                                        ("TC-MoE-XS/4", "lambda_dp", 0.5, "Switch-DiT"),
                                        ("EC-MoE-XS/4", "mask_form", "paper", "Switch-DiT"),
                                        ("DiT-XS/4", "moe_aux_alpha", 0.5, "TC-MoE and DiffMoE"),
                                        ("DiT-XS/4", "top_k", 1, "Switch-DiT"),
                                        ("Switch-DiT-XS/4", "moe_experts", 3, "TC-MoE, EC-MoE and DiffMoE"),
                                        ("Switch-DiT-XS/4", "dtr_alpha", 2.0, "DTR"),
                                        ("DTR-XS/4", "prior_alpha", 2.0, "Switch-DiT")]:
        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} applies to {owner} only; {model} "
                                             "ignores it: leave it at its default"):
            Config(model=model, **{option: value}).validate()
    Config(model="Switch-DiT-XS/4", num_experts=4, top_k=1, lambda_dp=0.0, mask_form="paper").validate()
    Config(model="DTR-XS/4", dtr_alpha=2.0, dtr_beta=0.5).validate()


def test_a_diffmoe_checkpoint_is_told_apart_from_the_other_mixtures():
    """Its predictor's weights name it: loading it as EC-MoE (or EC-MoE's as DiffMoE) is a one-line error that
    names the right model, and a foreign state dict's name is read from its tensors."""
    from switch_dit.checkpoint import CheckpointError
    from switch_dit.config import Config
    from switch_dit.loading import _name_from_tensors, build_checked

    diff = create_model("DiffMoE-XS/4", input_size=16, in_channels=1, num_classes=10).state_dict()
    ec = create_model("EC-MoE-XS/4", input_size=16, in_channels=1, num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match="holds a DiffMoE model, not EC-MoE-XS/4: pass --model DiffMoE-XS/4"):
        build_checked(Config(model="EC-MoE-XS/4", image_size=16), diff, "x.pt", 10, check_only=True)
    with pytest.raises(CheckpointError, match="holds a token-routed model, not DiffMoE-XS/4"):
        build_checked(Config(model="DiffMoE-XS/4", image_size=16), ec, "x.pt", 10, check_only=True)
    build_checked(Config(model="DiffMoE-XS/4", image_size=16), diff, "x.pt", 10, check_only=True)
    assert _name_from_tensors(diff, "x.pt", "DiT") == "DiffMoE-XS/4"
    for bad in (5.0, -0.1):  # thresholds are probabilities: every expert would take no token, or every token
        edited = {**diff, "blocks.2.mlp.threshold": torch.full((8,), bad)}
        with pytest.raises(CheckpointError, match=r"blocks.2.mlp.threshold holds values outside \[0, 1\]"):
            build_checked(Config(model="DiffMoE-XS/4", image_size=16), edited, "x.pt", 10, check_only=True)


def test_token_choice_sampling_flops_are_counted_as_computed():
    """An eager sampling forward of token choice computes its active FLOPs (each expert on exactly its tokens);
    compiled, it samples dropless through fixed buffers that hold every token for every expert: E / k times the
    routed FFN FLOPs. The other variants sample at their active compute either way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from switch_dit.flops import forward_gflops

    dit = forward_gflops("DiT-XS/4", 16, 1, 10)
    tc = forward_gflops("TC-MoE-XS/4", 16, 1, 10)
    model = create_model("TC-MoE-XS/4", input_size=16, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        for m in model.mixtures:
            m.gate_weight.normal_(0, 1.0)  # unbalanced routing: the count must not depend on the balance
        # attention's math backend, as on 'meta': the counter has no formula for the CPU flash kernel
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 990]), torch.tensor([0, 1, 2]))
    assert counter.get_total_flops() / 2 / 1e9 / 3 == pytest.approx(tc, rel=1e-9)
    tc_sampled = forward_gflops("TC-MoE-XS/4", 16, 1, 10, compiled_sampling=True)
    assert abs(tc / dit - 1) < 0.05 and tc_sampled > 2 * dit
    ffn = 16 * 192 * 768 * 2 * 6 / 1e9  # the dense FFNs' MACs: 16 tokens, D = 192 to 4D and back, 6 blocks
    routed = ffn * 2 / 3  # k = 2 of (k + 1 shared) fine-grained experts' share of the active FFN
    assert tc_sampled - tc == pytest.approx(routed * (8 / 2 - 1), rel=0.03)
    for name in ("EC-MoE-XS/4", "Switch-DiT-XS/4", "DiT-XS/4"):
        assert forward_gflops(name, 16, 1, 10, compiled_sampling=True) == forward_gflops(name, 16, 1, 10)


def test_options_are_checked():
    with pytest.raises(ValueError, match="moe_top_k"):
        create_model("TC-MoE-XS/4", input_size=8, in_channels=1, moe_experts=2, moe_top_k=3)
    with pytest.raises(ValueError, match="moe_scope"):
        create_model("EC-MoE-XS/4", input_size=8, in_channels=1, moe_scope="global")
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        create_model("TC-MoE-XS/4", input_size=8, in_channels=1, moe_capacity_factor=float("nan"))
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2", "--moe-top-k", "9", "--max-steps", 1) == 2


@pytest.mark.parametrize("model", ["TC-MoE-XS/2", "EC-MoE-XS/2", "DiffMoE-XS/2"])
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
    assert ("train/predictor_loss" in logged) == model.startswith("DiffMoE")
    assert "train/prior_loss" not in logged  # Switch-DiT's term: none here
    if model.startswith("DiffMoE"):  # the EMA model samples with thresholds fitted to its own predictor
        thresholds = [k for k in sa["model"] if k.endswith(".mlp.threshold")]
        assert len(thresholds) == 6 and not all(torch.equal(sa["ema"][k], sa["model"][k]) for k in thresholds)
        assert all(sa[key][k].min() > 0 for k in thresholds for key in ("model", "ema"))
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


def test_train_takes_a_variant_spec_as_its_model(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2:moe_experts=4,moe_shared=0", "--max-steps", 1,
                   "--results-dir", out) == 0
    state = load_state(out / "checkpoints" / "step_0000001.pt")
    assert state["config"]["model"] == "TC-MoE-XS/2" and state["config"]["moe_experts"] == 4
    assert state["model"]["blocks.0.mlp.experts.w1"].shape[0] == 4
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2:moe_experts=4", "--moe-experts", 6, "--max-steps", 1,
                   "--results-dir", tmp_path / "x") == 2
    assert "--moe-experts 6 is given too" in capsys.readouterr().err
    assert run_cli("train", *TINY, "--model", "TC-MoE-XS/2:moe_experts=4,moe_experts=16", "--max-steps", 1,
                   "--results-dir", tmp_path / "y") == 2
    assert "moe_experts is given twice" in capsys.readouterr().err and not (tmp_path / "y").exists()


def _ddp_worker(rank, world, port, out, model, options):
    from switch_dit.config import Config
    from switch_dit.train import train
    from tests.helpers import dist_env

    dist_env(rank, world, port)
    train(Config(model=model, data="digits", image_size=8, global_batch_size=8, lr=1e-3, max_steps=3, ckpt_every=3,
                 log_every=1, tensorboard=False, results_dir=out, device="cpu", objective="flow", **options),
          progress=False)


@pytest.mark.parametrize("model,options", [("EC-MoE-XS/2", {"moe_scope": "sample"}),
                                           ("TC-MoE-XS/2", {"moe_capacity_factor": 0.0, "moe_aux_alpha": 0.0})])
def test_ddp(tmp_path, model, options):
    """Two processes equal one where the routing has no batch-level coupling: expert choice within each sample,
    and token choice dropless without the balance loss (its capacity and balance loss, when on, see each process's
    own batch, as in every MoE trainer)."""
    from switch_dit.config import Config
    from switch_dit.train import train
    from tests.helpers import run_processes

    cfg = dict(model=model, data="digits", image_size=8, global_batch_size=8, lr=1e-3, max_steps=3, ckpt_every=3,
               log_every=1, tensorboard=False, device="cpu", objective="flow", **options)
    train(Config(results_dir=str(tmp_path / "one"), **cfg), progress=False)
    run_processes(_ddp_worker, 2, str(tmp_path / "two"), model, options)
    a = load_state(tmp_path / "one" / "checkpoints" / "step_0000003.pt")["model"]
    b = load_state(tmp_path / "two" / "checkpoints" / "step_0000003.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def _threshold_worker(rank, world, port, out):
    import torch.distributed as dist

    from tests.helpers import dist_env

    dist_env(rank, world, port)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        moe = CapacityPredictorMoE(16, 4, 2.0, 1).train()
        with torch.no_grad():
            moe.threshold.fill_(0.3)
        torch.manual_seed(10 + rank)  # each process routes its own batch
        moe(torch.randn(2, 8, 16))
        torch.save(moe.threshold.clone(), f"{out}/threshold{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_diffmoe_thresholds_are_averaged_over_processes(tmp_path):
    """Under DDP every process moves each threshold towards the mean over processes of its batch's C-th highest
    predicted probability, so sampling on any process uses the same thresholds."""
    from tests.helpers import run_processes

    run_processes(_threshold_worker, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"threshold{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    moe = CapacityPredictorMoE(16, 4, 2.0, 1).train()
    C = moe.capacity(16)
    quantiles = []
    for rank in range(2):
        torch.manual_seed(10 + rank)
        p = torch.sigmoid(moe.predictor(torch.randn(2, 8, 16).reshape(-1, 16))).detach()
        quantiles.append(p.sort(dim=0, descending=True).values[C - 1])
    want = 0.95 * 0.3 + 0.05 * (quantiles[0] + quantiles[1]) / 2
    assert not torch.allclose(quantiles[0], quantiles[1])  # the batches differ: the average is what makes them agree
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)


def _tc_shard_loss(model, rank):
    """TC-MoE's training loss on process `rank`'s own shard (fixed inputs): the output's MSE to a target plus the
    balance loss, with the default capacity 1.25 dropping slots of this shard only."""
    g = torch.Generator().manual_seed(100 + rank)
    x, target = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.randint(0, 1000, (4,), generator=g).float(), torch.randint(0, 10, (4,), generator=g)
    out = model(x, t, y)
    return ((out.sample - target) ** 2).mean() + out.aux_loss


def _tc_model():
    torch.manual_seed(0)
    model = create_model("TC-MoE-XS/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    with torch.no_grad():  # adaLN-Zero starts every block at the identity: open it so the mixtures get gradients
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model.train()


def _tc_ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    from tests.helpers import dist_env

    dist_env(rank, world, port)
    dist.init_process_group("gloo")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_tc_model())
        _tc_shard_loss(ddp, rank).backward()
        stats = [m.pop_stats() for m in ddp.module.modules() if isinstance(m, TokenChoiceMoE)]
        torch.save({"grads": {n: p.grad for n, p in ddp.module.named_parameters()}, "stats": stats},
                   f"{out}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tc_moe_default_under_ddp_averages_each_process_own_routing(tmp_path):
    """TC-MoE's default training (capacity 1.25, balance loss) is batch-coupled: each process routes, drops and
    balances its own shard. Under DDP every process must end with the mean of the shards' gradients, each computed
    as one process would, every parameter included (an expert without tokens still takes part in the reduction)."""
    from tests.helpers import run_processes

    run_processes(_tc_ddp_worker, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    want, stats = {}, []
    for rank in range(2):
        model = _tc_model()
        _tc_shard_loss(model, rank).backward()
        stats.append([m.pop_stats() for m in model.modules() if isinstance(m, TokenChoiceMoE)])
        for n, p in model.named_parameters():
            want[n] = want.get(n, 0) + p.grad / 2
    assert any(float(s[2]) > 0 for per_rank in stats for s in per_rank)  # some slots were dropped: capacity binds
    assert any(want[n].abs().max() > 0 for n in want if ".mlp.experts." in n)
    for rank in range(2):
        assert set(got[rank]["grads"]) == set(want)
        for n, g in got[rank]["grads"].items():
            torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=n)
        for a, b in zip(got[rank]["stats"], stats[rank]):  # each process counted its own shard's routing
            torch.testing.assert_close(a, b)


def _counting_worker(rank, world, port, out):
    from switch_dit.config import Config
    from switch_dit.models import moe
    from switch_dit.train import train
    from tests.helpers import dist_env

    own = []  # this process's own routing: each forward's increments of its counters
    forward = moe.TokenChoiceMoE.forward

    def counted(self, x):
        before = self.stats.clone()
        result = forward(self, x)
        own.append(self.stats - before)
        return result

    moe.TokenChoiceMoE.forward = counted
    dist_env(rank, world, port)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(Config(model="TC-MoE-XS/2", data="digits", image_size=8, global_batch_size=8, max_steps=2,
                           log_every=2, ckpt_every=2, tensorboard=False, results_dir=out, device="cpu",
                           objective="flow"), progress=False)
    torch.save({"own": torch.stack(own).sum(0), "logged": res["history"][-1],
                "warnings": [str(w.message) for w in caught]}, f"{out}/counts{rank}.pt")


def test_ddp_logs_the_routing_counters_of_every_process(tmp_path):
    """Under DDP the logged drop fraction is the run's, not process 0's: each process keeps its own counters (no
    buffer broadcast overwrites them between steps) and the log sums them over processes."""
    from tests.helpers import run_processes

    run_processes(_counting_worker, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"counts{r}.pt") for r in range(2)]
    own = [g["own"] for g in got]
    assert own[0][2] != own[1][2]  # the shards dropped different numbers of slots: the sum is not 2 x process 0's
    tokens, computed, dropped, unrouted = (own[0] + own[1]).tolist()
    assert dropped > 0
    for g in got:  # both processes log the same, whole-run numbers
        assert not [w for w in g["warnings"] if "buffers" in w]  # (no deprecated DDP option)
        assert g["logged"]["moe_dropped_slots"] == pytest.approx(dropped / (computed + dropped), rel=1e-6)
        assert g["logged"]["moe_tokens_without_routed_expert"] == pytest.approx(unrouted / tokens, rel=1e-6)


def test_diffmoe_trains_under_ddp(tmp_path):
    """DiffMoE is batch-coupled (each process pools its own batch), so two processes do not equal one; they must still
    train (the predictor is used every step: no unused parameters) and checkpoint moved thresholds."""
    from tests.helpers import run_processes

    run_processes(_ddp_worker, 2, str(tmp_path), "DiffMoE-XS/2", {})
    state = load_state(tmp_path / "checkpoints" / "step_0000003.pt")
    for key in ("model", "ema"):
        thresholds = [v for k, v in state[key].items() if k.endswith(".mlp.threshold")]
        assert thresholds and all(t.min() > 0 for t in thresholds), key
