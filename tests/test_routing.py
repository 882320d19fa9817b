import numpy as np
import pytest
import torch

from switch_dit import create_model
from switch_dit.models.routing import DTRRouter, SwitchRouter, dtr_table, reference_switch_mask, top_k_gates
from tests.conftest import randomize_


def naive_mask(router: SwitchRouter, x, t_emb):
    """Per sample: 1 + sum over its k chosen experts of g_j (x W_j + b_j), in plain loops."""
    rows = []
    for n in range(x.shape[0]):
        p = torch.softmax(router.gate_logits(t_emb[n : n + 1])[0], dim=-1)
        top = torch.topk(p, router.top_k)
        m = torch.ones_like(x[n]) * router.offset
        for g, j in zip(top.values, top.indices):
            m = m + g * (x[n] @ router.expert_weight[j] + router.expert_bias[j])
        rows.append(m)
    return torch.stack(rows)


def _grads(router, x, t_emb, fn):
    for p in list(router.parameters()) + [x, t_emb]:
        p.grad = None
    out = fn(router, x, t_emb)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [p.grad.clone() for p in list(router.parameters()) + [x, t_emb]]


@pytest.mark.parametrize("M,k", [(3, 2), (3, 1), (4, 4), (5, 2), (1, 1)])
def test_fast_smoe_equals_naive_per_sample_reference(M, k):
    torch.manual_seed(M * 10 + k)
    D = 16
    router = randomize_(SwitchRouter(D, M, k), std=0.3)
    x = torch.randn(6, 5, D, requires_grad=True)
    base = torch.randn(3, D)
    t_emb = base[torch.tensor([0, 1, 0, 2, 2, 0])].clone().requires_grad_(True)  # repeated timesteps
    fast = lambda r, xx, te: r(xx, torch.tensor([0, 1, 0, 2, 2, 0]), te)  # noqa: E731
    out_f, g_f = _grads(router, x, t_emb, fast)
    out_n, g_n = _grads(router, x, t_emb, naive_mask)
    out_r, g_r = _grads(router, x, t_emb, reference_switch_mask)
    assert torch.allclose(out_f, out_n, atol=1e-5)
    assert torch.allclose(out_r, out_n, atol=1e-5)
    for a, b, c in zip(g_f, g_n, g_r):
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(c, b, atol=1e-5)


def test_shared_timestep_path_equals_per_sample_path():
    router = randomize_(SwitchRouter(16, 3, 2), std=0.3)
    x = torch.randn(4, 5, 16)
    t_emb = torch.randn(1, 16).expand(4, 16)
    a = router(x, torch.full((4,), 7), t_emb)
    b = router(x, 7, t_emb)
    assert torch.allclose(a, b, atol=1e-6)


def test_top_k_gates_keep_k_largest_without_renormalising():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    g = top_k_gates(p, 2)
    assert torch.equal(g, torch.tensor([[0.5, 0.3, 0.0], [0.1, 0.0, 0.8]])) or torch.equal(
        g, torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.1, 0.8]]))
    assert ((g > 0).sum(-1) == 2).all()


def test_routing_depends_on_t_only():
    model = randomize_(create_model("Switch-DiT-XS/2", input_size=16, num_classes=10)).eval()
    t = torch.tensor([5, 5, 900, 900])
    x, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 7, 1, 9])
    x2, y2 = torch.randn(4, 4, 16, 16), torch.tensor([3, 2, 8, 0])
    t_emb = model.t_embedder(t)
    for r in model.switch_routers:
        g = r.gates(t_emb)
        assert torch.equal(g[0], g[1]) and torch.equal(g[2], g[3])
    # The gate never sees x or y: recording the gate input through a hook gives the timestep embedding.
    seen = []
    h = model.blocks[0].router.gate.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x, t, y), model(x2, t, y2)
    h.remove()
    assert torch.equal(seen[0], seen[1])
    assert torch.allclose(seen[0], model.t_embedder(t))


def test_dtr_router_masks_are_the_table_rows():
    router = DTRRouter(40, num_timesteps=100, alpha=4.0, beta=0.8)
    table = dtr_table(40, 100, 32, 4.0)
    t = torch.tensor([0, 50, 99])
    m = router(torch.zeros(3, 2, 40), t, None)
    assert torch.equal(m[:, 0], table[t])
    assert torch.equal(router(torch.zeros(3, 2, 40), 50, None)[0, 0], table[50])


def test_dtr_table_formula():
    C, T, beta, alpha = 384, 1000, 0.8, 4.0
    w = int(np.floor(C * beta))
    table = dtr_table(C, T, w, alpha)
    assert (table.sum(1) == w).all()
    start = table.argmax(1).numpy()
    expect = np.round(np.linspace(0, 1, T) ** alpha * (C - w))
    assert np.array_equal(start, expect)
    assert start[0] == 0 and start[-1] == C - w


def test_mask_keeps_small_expert_outputs_under_bf16_autocast():
    router = SwitchRouter(32, 3, 2)
    with torch.no_grad():
        router.expert_weight.normal_(0, 1e-4)  # expert outputs ~1e-3: below bf16's resolution around 1
    x, t_emb, t = torch.randn(2, 4, 32), torch.randn(2, 32), torch.tensor([1, 2])
    ref = router(x, t, t_emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = router(x, t, t_emb)
    assert amp.dtype == torch.float32
    assert torch.allclose(amp - 1, ref - 1, rtol=0.02, atol=1e-5)
    assert (ref - 1).abs().max() > 1e-4
