"""FID, Inception Score and k-NN precision/recall on feature arrays (any feature extractor)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2; unlike a general matrix square root this
    stays accurate when the covariances are singular (dead feature units, fewer samples than dimensions)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    w, v = linalg.eigh(sigma1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = linalg.eigvalsh(s1_half @ sigma2 @ s1_half)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits (ADM uses 10 splits). The splits are
    even (sizes differ by at most one, as np.array_split), also when N is not a multiple of splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    probs = logits.softmax(dim=1)
    if not 1 <= splits <= len(probs):
        raise ValueError(f"Inception Score needs 1 <= splits <= {len(probs)} samples, got {splits} splits")
    scores = []
    for part in probs.tensor_split(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    radii = []
    for s in range(0, len(feats), batch):
        d = torch.cdist(feats[s: s + batch], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    inside = []
    for s in range(0, len(points), batch):
        d = torch.cdist(points[s: s + batch], support)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019): k-NN balls around each set's points.
    precision = share of fake points inside the real manifold; recall = share of real inside the fake one."""
    if k < 1:
        raise ValueError(f"precision/recall needs k >= 1 neighbours, got k={k}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = _inside_manifold(f, r, _kth_neighbour_radii(r, k, batch), batch).float().mean()
    recall = _inside_manifold(r, f, _kth_neighbour_radii(f, k, batch), batch).float().mean()
    return float(precision), float(recall)
