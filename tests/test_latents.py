"""Latent path with a tiny AutoencoderKL saved locally: extract (both flips), train two steps, sample."""
import json

import numpy as np
import pytest
import torch

from tests.helpers import run_cli

import diffusers  # in the test extra: pip install -e '.[test]'  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(5):
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(root / c / f"{i}.png")
    Image.fromarray((rng.random((20, 20)) * 255).astype("uint8")).save(root / "dog" / "grey.png")  # grey -> RGB
    return root


def test_extract_train_sample(vae_dir, image_dir, tmp_path):
    lat = tmp_path / "latents"
    assert run_cli("extract-latents", "--data-path", image_dir, "--vae", vae_dir, "--out", lat, "--image-size", 16,
                   "--batch-size", 4) == 0
    meta = json.loads((lat / "meta.json").read_text())
    assert meta["num_items"] == 11 and meta["shape"] == [4, 8, 8] and meta["num_classes"] == 2
    means = np.load(lat / "mean.npy")
    assert means.shape == (11, 2, 4, 8, 8) and np.abs(means).sum() > 0
    assert not np.allclose(means[:, 0], means[:, 1])  # the flipped image has its own latent
    # Re-running skips the finished batches and leaves the cache as it was.
    assert run_cli("extract-latents", "--data-path", image_dir, "--vae", vae_dir, "--out", lat, "--image-size", 16,
                   "--batch-size", 4) == 0
    assert np.array_equal(np.load(lat / "mean.npy"), means)

    out = tmp_path / "run"
    assert run_cli("train", "--data", "latents", "--data-path", lat, "--image-size", 16, "--model", "Switch-DiT-XS/2",
                   "--global-batch-size", 4, "--max-steps", 2, "--ckpt-every", 2, "--tensorboard", "false",
                   "--results-dir", out, "--no-progress") == 0
    state = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert state["in_channels"] == 4 and state["input_size"] == 8 and state["config"]["vae"] == str(vae_dir)
    assert run_cli("sample", out / "checkpoints" / "step_0000002.pt", "--num-sampling-steps", 2,
                   "--num-fid-samples", 3, "--batch-size", 2, "--out", tmp_path / "s.npz", "--no-progress") == 0
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].shape == (3, 16, 16, 3) and d["arr_0"].dtype == np.uint8


def test_missing_vae_folder(tmp_path, image_dir, capsys):
    code = run_cli("extract-latents", "--data-path", image_dir, "--vae", tmp_path / "novae", "--out", tmp_path / "l")
    assert code != 0 and "no config.json" in capsys.readouterr().err
