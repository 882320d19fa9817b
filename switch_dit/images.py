"""The few image utilities the project needs (no torchvision): uint8 conversion, grids, PNG files."""
from __future__ import annotations

import math
import os

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as the ADM .npz format wants (C = 1 or 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) image, nrow images per row."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike, scale: int = 1) -> None:
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def label_rows(grid: np.ndarray, names: list[str], scale: int = 1, pad: int = 2) -> np.ndarray:
    """The grid up-scaled by scale, with each row of tiles named in a white margin on the left."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).convert("RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(draw.textlength(n) for n in names) + 8
    out = Image.new("RGB", (img.width + int(width), img.height), "white")
    out.paste(img, (int(width), 0))
    draw = ImageDraw.Draw(out)
    row = (img.height - pad * scale) / len(names)
    for i, name in enumerate(names):
        draw.text((4, pad * scale + i * row + row / 2 - 6), name, fill="black")
    return np.asarray(out)
