"""Data sets: Fashion-MNIST (the embedded default), scikit-learn digits (tests), image folders, cached latents.

Every data set is map-style and returns (x, y): x a float tensor in [-1, 1] (C, H, W) for images, or a cached
latent distribution for latent data; y an int label. Random flips are applied by the training loop, from
seeds derived from the step, so that data order and augmentation survive resume and do not depend on the
number of processes.
"""
from .datasets import (FASHION_MNIST_DEFAULT, DataError, DigitsDataset, FashionMNIST, ImageFolderDataset,
                       build_dataset, center_crop_arr)

__all__ = ["FASHION_MNIST_DEFAULT", "DataError", "DigitsDataset", "FashionMNIST", "ImageFolderDataset",
           "build_dataset", "center_crop_arr"]
