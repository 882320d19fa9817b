import numpy as np
import torch

from switch_dit.models.prior import DiffusionPrior, hamming_cost, js_divergence, match_columns, prior_table


def test_prior_table_rows_and_shared_slots():
    N, M, k = 12, 3, 2
    table = prior_table(N, M, k, 1000, 4.0)
    assert table.shape == (1000, N * M)
    assert (table.sum(1) == k * N).all()
    assert (table[:, 12:24] == 1).all()  # shared by every task
    assert not (table[:, :12] == 1).all(0).any() and not (table[:, 24:] == 1).all(0).any()
    start = table.argmax(1).numpy()
    assert np.array_equal(start, np.round(np.linspace(0, 1, 1000) ** 4 * (N * M - k * N)).astype(int))


def test_hamming_cost_is_column_hamming_distance():
    a = (torch.rand(50, 7) > 0.5).float()
    b = (torch.rand(50, 7) > 0.5).float()
    expect = (a[:, :, None] - b[:, None, :]).abs().sum(0)
    assert torch.equal(hamming_cost(a, b), expect)


def test_matching_recovers_a_known_permutation():
    torch.manual_seed(0)
    prior = (torch.rand(200, 9) > 0.5).float()  # distinct columns with overwhelming probability
    perm = torch.randperm(9)
    learned = prior[:, perm]
    found = match_columns(hamming_cost(learned, prior).numpy(), torch.Generator().manual_seed(1))
    assert np.array_equal(found, perm.numpy())


def test_matching_aligns_a_relabelled_prior_even_with_tied_columns():
    table = prior_table(12, 3, 2, 1000)  # slots 12..23 are identical all-ones columns: many ties
    perm = torch.randperm(36)
    learned = table[:, perm]
    for seed in range(3):
        found = match_columns(hamming_cost(learned, table).numpy(), torch.Generator().manual_seed(seed))
        assert torch.equal(table[:, torch.from_numpy(found)], learned)


def test_learned_pattern_has_k_per_block():
    prior = DiffusionPrior(5, 4, 3, 30)
    pattern = prior.learned_pattern(torch.randn(30, 5, 4))
    assert torch.equal(pattern.reshape(30, 5, 4).sum(-1), torch.full((30, 5), 3.0))


def test_tie_breaking_is_random_but_seeded():
    cost = np.zeros((6, 6))
    perms = {tuple(match_columns(cost, torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(perms) > 1
    assert np.array_equal(match_columns(cost, torch.Generator().manual_seed(3)),
                          match_columns(cost, torch.Generator().manual_seed(3)))


def test_jsd_properties():
    p = torch.softmax(torch.randn(5, 8), -1)
    q = torch.softmax(torch.randn(5, 8), -1)
    d = js_divergence(p, q)
    assert (d >= 0).all()
    assert torch.allclose(js_divergence(p, p), torch.zeros(5), atol=1e-6)
    assert torch.allclose(d, js_divergence(q, p), atol=1e-7)
    assert (d <= np.log(2) + 1e-5).all()
    # Against a direct formula with scipy's entropy.
    from scipy.spatial.distance import jensenshannon
    ref = torch.tensor([jensenshannon(a, b) ** 2 for a, b in zip(p.numpy(), q.numpy())])
    assert torch.allclose(d, ref.float(), atol=1e-4)


def test_prior_loss_value_and_zero_when_gates_match():
    # One block: each prior row has k ones, so gates with probabilities row / k match it exactly.
    N, M, k, T = 1, 3, 2, 50
    prior = DiffusionPrior(N, M, k, T)
    t = torch.tensor([0, 10, 49])
    probs = prior.table.reshape(T, N, M) / k
    logits = torch.log(probs + 1e-30)
    loss = prior(prior.start_matching(logits), logits[t], t)
    assert loss.abs() < 1e-5
    # A generic case against the formula: P = concat softmax / N, Q = matched row / (kN).
    N, M, k = 3, 3, 2
    prior = DiffusionPrior(N, M, k, T)
    logits = torch.randn(T, N, M, requires_grad=True)
    state = prior.rng_state()
    loss = prior(prior.start_matching(logits.detach()), logits[t], t)
    prior.set_rng_state(state)
    q = prior.matched_prior(logits)[t] / (k * N)
    p = logits[t].softmax(-1).flatten(1) / N
    a = (p + q) / 2
    kl = lambda u, v: (u * (torch.log(u + 1e-6) - torch.log(v + 1e-6))).sum(-1)  # noqa: E731
    assert torch.allclose(loss, (0.5 * kl(p, a) + 0.5 * kl(q, a)).mean())
    assert loss.item() > 0
    loss.backward()
    assert logits.grad[t].abs().sum() > 0
    other = torch.ones(T, dtype=torch.bool)
    other[t] = False
    assert (logits.grad[other] == 0).all()  # only the batch's timesteps receive gradient


def test_prior_rng_state_roundtrip():
    prior = DiffusionPrior(3, 3, 2, 20, seed=5)
    logits = torch.zeros(20, 3, 3)
    state = prior.rng_state()
    a = prior.matched_prior(logits)
    prior.set_rng_state(state)
    assert torch.equal(prior.matched_prior(logits), a)
