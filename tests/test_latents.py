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


def _cache(root, n=6, shape=(4, 4, 4), **meta):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    full = dict(num_items=n, shape=list(shape), scale_factor=0.18215, num_classes=2, class_names=["a", "b"])
    (root / "meta.json").write_text(json.dumps({**full, **meta}))
    np.save(root / "mean.npy", rng.standard_normal((n, 2, *shape)).astype(np.float16))
    np.save(root / "std.npy", (rng.random((n, 2, *shape)) + 0.1).astype(np.float16))
    np.save(root / "labels.npy", np.arange(n) % 2)
    return root


def _edit(root, **meta):
    (root / "meta.json").write_text(json.dumps({**json.loads((root / "meta.json").read_text()), **meta}))


def test_a_malformed_latent_cache_is_one_line_naming_the_file(tmp_path, capsys):
    """Each way a latent cache can be damaged or hand-made wrong is found when it is opened (or, for a non-finite
    latent, when it is read), named in one line with the remedy; before, most were tracebacks or trained."""
    from switch_dit.data.datasets import DataError
    from switch_dit.data.latents import LatentDataset

    ds = LatentDataset(_cache(tmp_path / "ok"))
    assert len(ds) == 6 and ds[1][0].shape == (2, 2, 4, 4, 4) and ds[1][1] == 1
    cases = {
        "labels out of range": (lambda r: np.save(r / "labels.npy", np.array([0, 1, 5, 0, 1, 0])), "labels.npy must"),
        "float labels": (lambda r: np.save(r / "labels.npy", np.linspace(0, 1, 6)), "integer labels"),
        "fewer labels": (lambda r: np.save(r / "labels.npy", np.arange(4) % 2), "with N = the 4 labels"),
        "shape vs meta": (lambda r: _edit(r, shape=[4, 8, 8]), "not (N, 2, 4, 8, 8)"),
        "non-square": (lambda r: _cache(r, shape=(4, 4, 6)), "shape (C, h, w) with h = w"),
        "no scale": (lambda r: (r / "meta.json").write_text(json.dumps({"shape": [4, 4, 4], "num_classes": 2,
                                                                        "class_names": ["a", "b"]})), "scale_factor"),
        "text scale": (lambda r: _edit(r, scale_factor="abc"), "scale_factor"),
        "names vs classes": (lambda r: _edit(r, num_classes=3), "class_names (2) for num_classes 3"),
        "a list": (lambda r: (r / "meta.json").write_text("[1, 2]"), "not a JSON object"),
        "bad json": (lambda r: (r / "meta.json").write_text("{'a': 1"), "meta.json is unreadable"),
        "truncated": (lambda r: (r / "mean.npy").write_bytes((r / "mean.npy").read_bytes()[:300]), "mean.npy is"),
        "missing": (lambda r: (r / "std.npy").unlink(), "std.npy is missing or unreadable"),
    }
    for name, (tamper, words) in cases.items():
        root = _cache(tmp_path / name.replace(" ", "_"))
        tamper(root)
        with pytest.raises(DataError, match="extract-latents") as e:
            LatentDataset(root)
        assert words in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    root = _cache(tmp_path / "nan")
    mean = np.load(root / "mean.npy")
    mean[3, 0, 0, 0, 0] = np.nan
    np.save(root / "mean.npy", mean)
    with pytest.raises(DataError, match="latent 3 of the cache holds NaN"):
        LatentDataset(root)[3]
    # the command says it in one line (exit 2), before training
    capsys.readouterr()
    assert run_cli("train", "--data", "latents", "--data-path", tmp_path / "labels_out_of_range", "--model",
                   "DiT-XS/2", "--global-batch-size", 2, "--max-steps", 1, "--results-dir", tmp_path / "r",
                   "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels.npy must hold integer labels in [0, 2)" in err
    assert not (tmp_path / "r").exists()
