"""In-memory and on-disk image data sets."""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """Bad or missing data; the message names the problem and the fix."""


def _to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images_uint8)).float().div(127.5).sub(1.0)


def _fit_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size): zero-pad (black, i.e. -1) when larger, area/bilinear resize otherwise."""
    h = x.shape[-1]
    if h == size:
        return x
    if size > h and (size - h) % 2 == 0 and size - h <= 8:
        p = (size - h) // 2  # e.g. 28 -> 32 by padding, the usual way for MNIST-like data
        return F.pad(x, (p, p, p, p), value=-1.0)
    mode = "area" if size < h else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic (2 zero bytes, dtype code, ndim), big-endian dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; re-install the data set") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); re-install the data set")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class TensorImageDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names=None):
        self.images, self.labels, self.num_classes = images, labels.long(), num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    @property
    def shape(self):
        return tuple(self.images.shape[1:])


class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST from its four original IDX .gz files (Debian package dataset-fashion-mnist)."""

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_DEFAULT, split: str = "train", image_size: int = 32):
        root = Path(root)
        names = FASHION_MNIST_FILES[split]
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise DataError(
                f"Fashion-MNIST not found: {root} lacks {', '.join(missing)}; install it with "
                f"'apt-get update && apt-get install -y dataset-fashion-mnist' (files land in {FASHION_MNIST_DEFAULT}) "
                f"or pass --data-path to a folder holding the four IDX .gz files")
        images, labels = read_idx(root / names[0]), read_idx(root / names[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST files in {root} do not match: {images.shape} images, {labels.shape} labels")
        x = _fit_size(_to_unit_range(images).unsqueeze(1), image_size)
        super().__init__(x, torch.from_numpy(labels.astype(np.int64)), 10, FASHION_MNIST_CLASSES)


class DigitsDataset(TensorImageDataset):
    """scikit-learn's 1,797 8x8 digits (ships with scikit-learn): a tiny data set for tests."""

    def __init__(self, image_size: int = 8):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        x = torch.from_numpy(d.images).float().div(8.0).sub(1.0).unsqueeze(1)  # pixel values are 0..16
        super().__init__(_fit_size(x, image_size), torch.from_numpy(d.target), 10)


def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop: halve with box filtering while the short side >= 2*size, bicubic-resize the short
    side to size, then crop the centre square."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_rgb(im):
    """An 8-bit RGB image of any PIL mode. Grey, palette, RGBA and CMYK convert as PIL does; integer grey (I;16, I)
    is read as 16-bit (0-65535) and float grey (F) as 0-1, by mode, so every image of a data set is scaled alike.
    PIL's own conversion clips them: a mid-grey 16-bit image trained as white, a float one as black."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" else 65535.0
        if not np.isfinite(a).all() or a.min(initial=0.0) < 0 or a.max(initial=0.0) > top:
            raise ValueError(f"a {im.mode}-mode image with values outside 0-{top:g} (or not finite), the range its "
                             "mode is read in; save it as an 8- or 16-bit image")
        im = Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8))  # (2-D uint8: mode L)
    return im.convert("RGB")


class ImageFolderDataset(Dataset):
    """ImageNet / FFHQ layout: one subfolder per class, or a flat folder of images (unconditional, one class).

    Corrupt or unreadable files raise a DataError naming the file, or with ``skip_corrupt`` are replaced by
    another image with a warning and counted in ``num_skipped``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, skip_corrupt: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist; give the path of a folder of images (one subfolder "
                            "per class, or a flat folder for unconditional data)")
        # hidden folders (.ipynb_checkpoints, .git, ...) are neither classes nor images of one
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = sorted(f for f in root.iterdir() if _is_image(f))  # images outside any subfolder
        if subdirs:
            if loose:  # (they would be left out without a word)
                raise DataError(f"{root} holds class subfolders ({', '.join(repr(d.name) for d in subdirs[:3])}"
                                f"{', ...' if len(subdirs) > 3 else ''}) and {len(loose)} image(s) outside them, e.g. "
                                f"{loose[0].name!r}: put every image in a class folder, or move the subfolders out "
                                "for unconditional data")
            self.class_names = [p.name for p in subdirs]
            files = [(f, c) for c, d in enumerate(subdirs) for f in sorted(d.rglob("*"))
                     if _is_image(f) and not any(part.startswith(".") for part in f.relative_to(d).parts)]
            present = {c for _, c in files}
            empty = [d.name for c, d in enumerate(subdirs) if c not in present]
            if files and empty:  # a class without images would still get a label, an embedding and a grid row
                raise DataError(f"class folder(s) {', '.join(repr(n) for n in empty[:5])} in {root} hold no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}): add images or remove the folder(s)")
        else:
            self.class_names = ["all"]
            files = [(f, 0) for f in loose]
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {root}")
        self.files = files
        self.num_classes = len(self.class_names)
        self.image_size = image_size
        self.skip_corrupt = skip_corrupt
        self.num_skipped = 0

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):
        return (3, self.image_size, self.image_size)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(to_rgb(im), self.image_size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            hint = "skipped" if self.skip_corrupt else "remove it or pass --skip-corrupt"
            raise DataError(f"corrupt or unreadable image {path}: {e}; {hint}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def __getitem__(self, i):
        for attempt in range(len(self.files)):
            j = (i + attempt) % len(self.files)
            try:
                return self.load(j), self.files[j][1]
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                self.num_skipped += 1
                warnings.warn(str(e), stacklevel=2)
        raise DataError("every image in the folder is unreadable")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
