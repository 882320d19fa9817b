"""Bad input: a clear one-line error and a non-zero exit, for each case the issue names."""
import pytest
import torch

from tests.helpers import TINY, run_cli


def _one_line_error(capsys, *args):
    capsys.readouterr()
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_fashion_mnist_says_how_to_install(tmp_path, capsys):
    err = _one_line_error(capsys, "train", "--data", "fashion-mnist", "--data-path", tmp_path / "nope",
                          "--results-dir", tmp_path / "r", "--no-progress")
    assert "apt-get install -y dataset-fashion-mnist" in err and "--data-path" in err


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, "train", *TINY, "--data", "folder", "--data-path", tmp_path / "empty",
                          "--results-dir", tmp_path / "r")
    assert "no images" in err and "empty" in err


def test_corrupt_image_named_or_skipped(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    for i in range(8):
        Image.fromarray((np.random.rand(12, 12, 3) * 255).astype("uint8")).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    args = ["train", *TINY, "--data", "folder", "--data-path", tmp_path / "imgs", "--image-size", 8,
            "--max-steps", 3, "--results-dir", tmp_path / "r"]
    err = _one_line_error(capsys, *args)
    assert "broken.png" in err and "--skip-corrupt" in err
    with pytest.warns(UserWarning, match="broken.png"):
        assert run_cli(*args, "--skip-corrupt", "--ckpt-every", 100) == 0


def test_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--max-steps", 1, "--results-dir", out) == 0
    err = _one_line_error(capsys, "train", *TINY, "--model", "DiT-XS/2", "--max-steps", 2, "--results-dir", out,
                          "--resume", "auto")
    assert "another model/config" in err and "DiT-XS/2" in err


def test_unknown_model_name(tmp_path, capsys):
    err = _one_line_error(capsys, "train", *TINY, "--model", "Switch-DiT-Q/2", "--results-dir", tmp_path / "r")
    assert "unknown model name 'Switch-DiT-Q/2'" in err


def test_top_k_larger_than_num_experts(tmp_path, capsys):
    err = _one_line_error(capsys, "train", *TINY, "--top-k", 4, "--num-experts", 3, "--results-dir", tmp_path / "r")
    assert "--top-k=4" in err and "--num-experts=3" in err


def test_unwritable_results_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_error(capsys, "train", *TINY, "--results-dir", blocker / "sub")
    assert "not writable" in err and "--results-dir" in err


def test_unknown_yaml_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("global-batch-size: 8\nlearning_rate: 0.1\n")
    err = _one_line_error(capsys, "train", *TINY, "--config", cfg, "--results-dir", tmp_path / "r")
    assert "learning_rate" in err


def test_yaml_config_keys_are_the_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-steps: 2\nckpt_every: 2\ntop-k: 1\n")
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--config", cfg, "--results-dir", out) == 0
    state = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert state["config"]["top_k"] == 1 and state["step"] == 2
