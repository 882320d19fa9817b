"""Score a set of images (an .npz, an image folder, or samples drawn from a checkpoint) against a data set."""
from __future__ import annotations

import hashlib
import zipfile
import json
import os
import sys
from pathlib import Path

import numpy as np

from .features import Extractor
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall

DEFAULT_CACHE = Path(os.environ.get("SWITCH_DIT_CACHE", Path.home() / ".cache" / "switch-dit"))


def load_npz(path) -> tuple[np.ndarray, dict]:
    """The images of an ADM .npz and the manifest switch-dit wrote beside them ({} for other files)."""
    images = load_npz_images(path)
    try:
        with np.load(path) as d:
            manifest = json.loads(str(d["manifest"])) if "manifest" in d else {}
    except (OSError, ValueError, EOFError):
        manifest = {}
    return images, manifest if isinstance(manifest, dict) else {}


def load_npz_images(path) -> np.ndarray:
    try:
        with np.load(path) as d:
            if "arr_0" not in d:
                raise ValueError(f"{path} has no arr_0: an ADM sample file holds uint8 (N, H, W, C) images under arr_0")
            arr = d["arr_0"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:  # not a zip, truncated, objects
        if "arr_0" in str(e) and isinstance(e, ValueError) and "has no arr_0" in str(e):
            raise
        raise ValueError(f"cannot read {path} as an .npz of images ({type(e).__name__}); an ADM sample file holds "
                         "uint8 (N, H, W, C) images under arr_0 (switch-dit sample --num-fid-samples writes one)") from None
    return check_images(arr, str(path))


MIN_IMAGES = 10  # FID needs a covariance, precision/recall k + 1 neighbours


def check_images(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: images must be uint8 (N, H, W, C) with C = 1 or 3, got {arr.dtype} {arr.shape}; "
                         "switch-dit sample --num-fid-samples writes that format")
    if len(arr) < MIN_IMAGES:
        raise ValueError(f"{what}: {len(arr)} images are too few to score (FID needs a covariance, precision/recall "
                         f"k + 1 neighbours); give at least {MIN_IMAGES}")
    return arr


def subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a seeded random subset of limit of n items (all of them, in order, without a limit)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--ref-limit must be >= 1, got {limit}")
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def load_folder_images(path, image_size: int | None = None, limit: int | None = None) -> np.ndarray:
    from ..data import ImageFolderDataset
    from ..images import to_uint8
    import torch

    if not path:
        raise ValueError("a folder of images needs its path: --ref-data folder --ref-path FOLDER")
    ds = ImageFolderDataset(path, image_size or 256)
    return to_uint8(torch.stack([ds[int(i)][0] for i in subset(len(ds), limit)]))


def check_reference(data: str, data_path: str | None, split: str) -> None:
    """A reference that can be read as asked: a split the data has, a path where the data reads one."""
    if data in ("digits", "folder") and split != "train":  # (only Fashion-MNIST has a test split)
        raise ValueError(f"--ref-split {split}: {data} has no {split} split (its reference is the whole set); leave "
                         "--ref-split out")
    if data == "digits" and data_path:
        raise ValueError(f"--ref-path {data_path}: digits is built in (scikit-learn) and reads no path; leave "
                         "--ref-path out, or use --ref-data folder for images in a folder")


def reference_images(data: str, data_path: str | None, split: str, image_size: int, limit: int | None) -> np.ndarray:
    """The reference set; with limit, a random subset of that many (seeded: the same subset every time)."""
    from ..images import to_uint8
    from ..data.datasets import FASHION_MNIST_DEFAULT, FashionMNIST, DigitsDataset

    check_reference(data, data_path, split)
    if data == "fashion-mnist":
        ds = FashionMNIST(data_path or FASHION_MNIST_DEFAULT, split, image_size)
        images = ds.images
    elif data == "digits":
        images = DigitsDataset(image_size).images
    elif data == "folder":
        return load_folder_images(data_path, image_size, limit)
    else:
        raise ValueError(f"no reference images for data {data!r}: use fashion-mnist, digits or folder")
    return to_uint8(images[subset(len(images), limit)])


def reference_features(extractor: Extractor, data: str, data_path: str | None, split: str, image_size: int,
                       limit: int | None, cache_dir=DEFAULT_CACHE) -> tuple[np.ndarray, np.ndarray | None, Path]:
    """Features of the reference set, cached on disk under a hash of everything they depend on."""
    check_reference(data, data_path, split)
    key = json.dumps({"extractor": extractor.ident, "data": data, "path": str(data_path), "split": split,
                      "size": image_size, "limit": limit, "subset": "random-seed0" if limit else "all",
                      "mtime": _mtime(data, data_path)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    for d in (Path(cache_dir), Path(cache_dir) / "refstats"):
        if d.exists() and not d.is_dir():
            raise ValueError(f"--cache-dir {cache_dir}: {d} is a file, not a folder; give a folder for the cache")
    path = Path(cache_dir) / "refstats" / f"{digest}.npz"
    if path.is_file():
        with np.load(path) as d:
            return d["feats"], (d["logits"] if "logits" in d else None), path
    images = reference_images(data, data_path, split, image_size, limit)
    note = extractor.estimate(len(images))
    if note:
        print(note + "; the reference features are cached afterwards", file=sys.stderr, flush=True)
    feats, logits = extractor(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, feats=feats, **({"logits": logits} if logits is not None else {}), key=np.array(key))
    os.replace(tmp, path)
    return feats, logits, path


def _mtime(data: str, data_path) -> float | None:
    """When the reference files last changed (part of the cache key); None for built-in digits, which has no files
    (the working folder's time, used before, missed the cache at every run)."""
    from ..data.datasets import FASHION_MNIST_DEFAULT
    if data == "digits":
        return None
    p = Path(data_path or FASHION_MNIST_DEFAULT) if data_path or data == "fashion-mnist" else None
    return p.stat().st_mtime if p is not None and p.exists() else None


def score(images: np.ndarray, extractor: Extractor, ref_feats: np.ndarray, k: int = 3,
          pr_limit: int = 10_000, extracted: tuple | None = None) -> dict:
    """FID against the reference statistics, IS (where the extractor has logits), precision/recall (k-NN).
    extracted: the (features, logits) extractor(images) already gave, so a caller that needs them too runs the
    network once."""
    images = check_images(images, "samples")
    if extracted is None:
        note = extractor.estimate(len(images))
        if note:
            print(note, file=sys.stderr, flush=True)
        extracted = extractor(images)
    feats, logits = extracted
    fd = extractor.fid_dims
    fid = frechet_distance(*feature_stats(feats[:, fd]), *feature_stats(ref_feats[:, fd]))
    out = {"num_samples": int(len(images)), "features": extractor.name, "fid": fid, "note": extractor.note}
    if len(images) < max(extractor.fid_dim, 5000):
        out["warning"] = small_sample_warning(len(images), extractor.fid_dim)
        print(f"[switch-dit] warning: {out['warning']}", file=sys.stderr, flush=True)
    if logits is not None:
        out["is_mean"], out["is_std"] = inception_score(logits, splits=min(10, len(images) // 2 or 1))
    else:
        out["is_mean"] = out["is_std"] = None
        out["is_note"] = "this feature network has no classifier logits: no Inception Score"
    n = min(len(feats), len(ref_feats), pr_limit)
    rng = np.random.default_rng(0)
    ref = ref_feats[rng.choice(len(ref_feats), n, replace=False)] if len(ref_feats) > n else ref_feats
    md = extractor.manifold_dims
    out["precision"], out["recall"] = precision_recall(ref[:, md], feats[:n, md], k=k)
    out["k"] = k
    return out


def small_sample_warning(n: int, dim: int) -> str:
    """What a small sample does to FID: fewer samples than feature dimensions leave the covariance
    rank-deficient, and FID is biased upward at any finite N (more so the smaller N)."""
    what = (f"{n} samples are fewer than the {dim} feature dimensions: the sample covariance is rank-deficient and "
            "FID is not meaningful; use at least " + f"{max(dim, 5000)} samples" if n < dim else
            f"FID from {n} samples is biased upward (the usual protocol uses 50,000; 5,000 at the least)")
    return what + "; compare FIDs only at equal sample counts"
