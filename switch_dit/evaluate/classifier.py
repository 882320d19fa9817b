"""A small CNN for Fashion-MNIST: its penultimate features give FID / precision / recall and its logits give IS.

These numbers are NOT comparable with Inception-based FID/IS: they measure the same things with a network
trained on Fashion-MNIST, which is what makes them meaningful on 32x32 grey garments. The weights ship
with the package (switch_dit/evaluate/weights/), made by scripts/train_classifier.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"
FEATURE_DIM = 128


def _conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """Input (N, 1, 32, 32) in [-1, 1] (28x28 inputs are padded); features (N, 128), logits (N, 10)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_conv(1, 32), _conv(32, 32), nn.MaxPool2d(2),
                                  _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2),
                                  _conv(64, 128), nn.MaxPool2d(2))
        self.fc = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"the Fashion-MNIST classifier takes 1-channel images, got {x.shape[1]} channels")
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(self.prepare(x)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str | Path = WEIGHTS, device="cpu") -> FashionClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} are missing; make them with "
                                "'python scripts/train_classifier.py' (a few CPU minutes)")
    model = FashionClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.to(device).eval()
