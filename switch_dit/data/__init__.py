"""Data sets: Fashion-MNIST (the embedded default), scikit-learn digits (tests), image folders, cached latents.

Every data set is map-style and returns (x, y): x a float tensor in [-1, 1] (C, H, W) for images, or a cached
latent distribution for latent data; y an int label. Random flips are applied by the training loop, from
seeds derived from the step, so that data order and augmentation survive resume and do not depend on the
number of processes.
"""
from .datasets import (FASHION_MNIST_DEFAULT, DataError, DigitsDataset, FashionMNIST, ImageFolderDataset,
                       center_crop_arr)
from .latents import LatentDataset


def build_dataset(name: str, data_path: str | None, image_size: int, skip_corrupt: bool = False):
    """'fashion-mnist' (default folder when data_path is None), 'digits', 'folder' or 'latents'."""
    if name == "fashion-mnist":
        return FashionMNIST(data_path or FASHION_MNIST_DEFAULT, "train", image_size)
    if name == "digits":
        if data_path:  # (it would be ignored: a folder named here is not what trains or is measured)
            raise DataError(f"--data digits is scikit-learn's built-in set; --data-path {data_path} applies to "
                            "fashion-mnist, folder and latents: leave it out")
        return DigitsDataset(image_size)
    if name == "folder":
        if not data_path:
            raise DataError("--data folder needs --data-path pointing at an image folder")
        return ImageFolderDataset(data_path, image_size, skip_corrupt)
    if name == "latents":
        if not data_path:
            raise DataError("--data latents needs --data-path pointing at a folder made by 'switch-dit extract-latents'")
        return LatentDataset(data_path)
    raise DataError(f"unknown data set {name!r}: choose fashion-mnist, digits, folder or latents")


__all__ = ["FASHION_MNIST_DEFAULT", "DataError", "DigitsDataset", "FashionMNIST", "ImageFolderDataset",
           "LatentDataset", "build_dataset", "center_crop_arr"]
