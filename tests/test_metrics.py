import numpy as np
import pytest

from switch_dit.evaluate.metrics import (fid_from_features, frechet_distance, inception_score, precision_recall)


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_of_shifted_gaussians_matches_closed_form():
    # Two Gaussians: FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); diagonal case by hand.
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expect = 5.0 + (1 + 4 + 9) + (4 + 1 + 1) - 2 * (2 + 2 + 3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, abs=1e-8)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200000, 3)) * np.sqrt([1.0, 4.0, 9.0])
    b = rng.normal(size=(200000, 3)) * np.sqrt([4.0, 1.0, 1.0]) + mu2
    assert fid_from_features(a, b) == pytest.approx(expect, abs=0.1)


def test_fid_matches_the_general_matrix_square_root_formula():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # singular covariances (a dead unit) are fine and give no warning
    s1[0, :] = s1[:, 0] = 0
    assert np.isfinite(frechet_distance(mu1, s1, mu1, s1)) and abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).normal(size=(300, 5))
    assert precision_recall(x, x, k=3, batch=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # a fake set inside a region of the real one: full precision, partial recall
    p, r = precision_recall(x, x[x[:, 0] > 0.5], k=3)
    assert p == 1.0 and 0 < r < 0.6


def test_inception_score_bounds():
    assert inception_score(np.zeros((100, 10)), splits=1)[0] == pytest.approx(1.0)
    confident = np.full((1000, 10), -50.0)
    confident[np.arange(1000), np.arange(1000) % 10] = 50.0
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_precision_recall_needs_enough_points():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_inception_score_splits_are_even_when_n_is_not_a_multiple():
    # 25 samples in 10 splits: sizes 3,3,3,3,3,2,2,2,2,2 as np.array_split (torch.chunk would make 9 splits)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(25, 4)) * 3
    mean, std = inception_score(logits, splits=10)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = []
    for part in np.array_split(probs, 10):
        py = part.mean(0, keepdims=True)
        ref.append(np.exp((part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()))
    assert len(ref) == 10
    assert mean == pytest.approx(np.mean(ref), rel=1e-9) and std == pytest.approx(np.std(ref), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=26)
