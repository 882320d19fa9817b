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


def _each_refused_in_one_line(capsys, cases):
    """Each (args, words): exit code 2 and one line on stderr holding the words, no traceback."""
    for args, words in cases:
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert words in err, (args, err)


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


def test_each_case_a_hostile_tester_found_is_one_line(tmp_path, capsys):
    """The inputs of the hardening round two (tracebacks, silently accepted nonsense, unclear messages), each now
    refused up front in one line that names the problem."""
    import json as _json

    import numpy as np

    from tests.helpers import TINY

    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--model", "DiT-XS/2", "--max-steps", 1, "--ckpt-every", 1, "--results-dir",
                   run) == 0
    ckpt = run / "checkpoints" / "step_0000001.pt"
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "int.yaml").write_text("1: 2\n")
    (tmp_path / "dict.yaml").write_text("model: {a: 1}\n")
    (tmp_path / "null.yaml").write_text("model: null\n")
    (tmp_path / "latin1.yaml").write_bytes(b"lr: 1e-3\nmodel: '\xff\xfe'\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "garbage.npz").write_text("garbage")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((12, 8, 8, 1), np.uint8))
    train = ["train", *TINY, "--max-steps", 1, "--results-dir", tmp_path / "r"]
    cmp = ["compare", "--data", "digits", "--image-size", 8, "--patch", 2, "--no-progress"]
    cases = [
        (train + ["--image-size", 100000], "--image-size must be between 1 and 4096"),
        (train + ["--model", "EC-MoE-XS/4", "--moe-experts", 100000], "GiB, more than the"),  # (was an OOM kill)
        (train + ["--device", "tpu9"], "--device must be auto, cpu, cuda, cuda:N or mps"),
        (train + ["--config", tmp_path / "cfgdir"], "is a folder; give a YAML file"),
        (train + ["--config", tmp_path / "int.yaml"], "1 is not an option name"),
        (["train", "--config", tmp_path / "dict.yaml", "--results-dir", tmp_path / "r"], "option model must be a string"),
        (["train", "--config", tmp_path / "null.yaml", "--results-dir", tmp_path / "r"], "option model must be a string"),
        (train + ["--config", tmp_path / "latin1.yaml"], "latin1.yaml is not UTF-8 text"),
        (train + ["--lr", "inf"], "--lr must be a finite number"),
        (train + ["--vae", tmp_path / "novae"], "no AutoencoderKL folder there"),
        (["sample", ckpt, "--out", tmp_path / "outdir"], "a grid is written as PNG"),
        (["sample", ckpt, "--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["sample", ckpt, "--model", "Bogus-Q/9"], "unknown model name 'Bogus-Q/9'"),
        (["sample", ckpt, "--model", "Switch-DiT-XS/2"], "holds a DiT-XS/2 model (recorded in the file)"),
        (["sample", ckpt, "--num-fid-samples", 4, "--out", tmp_path / "x.png"], "give a name ending in .npz"),
        (["sample", tmp_path / "outdir"], "is a folder without config.json"),
        (["evaluate", "--npz", tmp_path / "s.npz", "--ref-data", "folder"], "--ref-data folder needs --ref-path"),
        (["evaluate", "--npz", tmp_path / "s.npz", "--ref-data", "digits", "--cache-dir", tmp_path / "afile"],
         "is a file, not a folder"),
        (["evaluate", "--npz", tmp_path / "s.npz", "--ref-data", "digits", "--k", 0], "--k must be >= 1"),
        (["evaluate", "--npz", tmp_path / "garbage.npz", "--ref-data", "digits"], "cannot read"),
        (["analyze", ckpt, "--out", tmp_path / "afile"], "without learned routing"),
        (["export", ckpt, "--out", tmp_path / "missing" / "x.safetensors"], "does not exist; choose another --out"),
        (cmp + ["--max-steps", 0, "--out", tmp_path / "c"], "--max-steps must be >= 1"),
        (cmp + ["--eval-every", 0, "--out", tmp_path / "c"], "--eval-every must be >= 1"),
        (cmp + ["--num-samples", 1, "--out", tmp_path / "c"], "--num-samples must be >= 10"),
        (cmp + ["--out", tmp_path / "afile"], "is a file; give a folder for the report"),
    ]
    _each_refused_in_one_line(capsys, cases)
    assert not (tmp_path / "c" / "runs").exists()  # compare refused before any training
    del _json


def test_the_memory_check_covers_latent_models_and_machines_that_cannot_tell(monkeypatch):
    """A model too large for the device is refused before anything is allocated, for latent data too (its input
    size is the data set's, but its parameters do not depend on it); where the system cannot say its memory
    (sysconf -1), nothing is refused."""
    import os

    import torch

    from switch_dit.config import Config
    from switch_dit.train import _check_fits_memory, preflight

    with pytest.raises(ValueError, match="GiB, more than the"):
        preflight(Config(model="EC-MoE-XS/4", moe_experts=100_000, data="latents", data_path="/nonexistent"))
    preflight(Config(model="EC-MoE-XS/4", data="latents", data_path="/nonexistent"))  # a model that fits
    monkeypatch.setattr(os, "sysconf", lambda name: -1)
    _check_fits_memory(Config(), 10**12, torch.device("cpu"))


def test_each_case_of_the_third_hostile_round_is_one_line_and_up_front(tmp_path, capsys):
    """Sampling options that used to end a run at its first sample grid (losing its steps), options that trained
    nonsense (a negative UW lr ascends, p2 with k <= 0, a negative prior exponent), --out paths found unwritable only
    after the work, grids too large to allocate, duplicate compare seeds, and files that are not checkpoints."""
    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", run) == 0
    ckpt = run / "checkpoints" / "step_0000001.pt"
    (tmp_path / "afile").write_text("x")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "c.yaml").write_text("lr: 0.001\n")
    train = ["train", *TINY, "--max-steps", 4, "--sample-every", 2, "--results-dir", tmp_path / "r"]
    under_file = tmp_path / "afile" / "x"
    cases = [
        (train + ["--num-sampling-steps", 5000], "--num-sampling-steps 5000 exceeds --diffusion-steps 1000"),
        (train + ["--cfg-channels", -1], "--cfg-channels must be >= 1"),
        (train + ["--cfg-channels", 7], "--cfg-channels 7 exceeds the data's 1 channels"),
        (train + ["--loss-weighting", "uw", "--uw-lr", -1], "--uw-lr must be > 0"),
        (train + ["--loss-weighting", "p2", "--p2-k", -1], "--p2-k must be > 0"),
        (train + ["--loss-weighting", "p2", "--p2-gamma", -0.5], "--p2-gamma must be >= 0"),
        (train + ["--prior-alpha", -3], "--prior-alpha (the prior table's DTR exponent) must be > 0"),
        (["sample", ckpt, "--out", f"{under_file}.png"], "afile is a file, not a folder; choose another --out"),
        (["sample", ckpt, "--num-fid-samples", 4, "--out", f"{under_file}.npz"], "afile is a file, not a folder"),
        (["sample", ckpt, "--num-fid-samples", 4, "--format", "png", "--out", under_file], "afile is a file"),
        (["analyze", ckpt, "--out", under_file], "afile is a file, not a folder"),
        (["evaluate", "--ckpt", ckpt, "--num-samples", 10, "--ref-data", "digits", "--out", f"{under_file}.json"],
         "afile is a file, not a folder"),
        (["evaluate", "--ckpt", ckpt, "--num-samples", 10, "--ref-data", "digits", "--out", tmp_path / "outdir"],
         "outdir is a folder; give the file to write"),
        (["evaluate", "--ckpt", ckpt, "--num-samples", 10, "--ref-data", "digits", "--ref-image-size", 0],
         "--ref-image-size must be between 1 and 4096"),
        (["sample", ckpt, "--scale", 1000, "--out", tmp_path / "g.png"], "over 268 million pixels; lower --scale"),
        (["sample", ckpt, "--per-class", 100000, "--out", tmp_path / "g.png"], "a grid of 1000000 images"),
        (["sample", tmp_path / "c.yaml"], "c.yaml is not a PyTorch checkpoint (no zip or pickle inside)"),
        (["export", tmp_path / "afile", "--out", tmp_path / "e.safetensors"], "afile is not a PyTorch checkpoint"),
        (["compare", "--data", "digits", "--image-size", 8, "--patch", 2, "--seeds", 0, 0, "--out", tmp_path / "c"],
         "--seeds names a seed twice"),
        (["compare", "--data", "digits", "--image-size", 8, "--patch", 2, "--seeds", -1, 4294967295, "--out",
          tmp_path / "c"], "--seeds names a seed twice"),
    ]
    cases += [
        (["train", *TINY, "--max-steps", 1, "--results-dir", ""], "--results-dir must name a folder"),
        (["sample", ckpt, "--out", ""], "give a name ending in .png"),
        (["analyze", ckpt, "--out", ""], "--out is empty"),
        (["analyze", ckpt, "--noise-schedule", "bogus"], "--noise-schedule must be linear or cosine"),
        (["analyze", ckpt, "--preset", "imagenet256"], "analyze takes no --preset or --config"),
        (["evaluate", "--ckpt", ckpt, "--num-samples", 5, "--ref-data", "digits"], "--num-samples must be >= 10"),
        (["evaluate", "--ckpt", ckpt, "--ref-data", "digits", "--image-size", 8], "--image-size sizes the images of"),
        (["sample", run], "is a training run's folder; give one of its checkpoints, e.g. the newest, " + str(ckpt)),
        (["train", *TINY, "--max-steps", 1, "--model", "Switch-DiT-XS/2:resume=auto", "--results-dir",
          tmp_path / "r"],
         "resume is not an option of the model; give it as --resume"),
        (["train", *TINY, "--max-steps", 1, "--model", "TC-MoE-XS/4:moe_shared=1000", "--results-dir",
          tmp_path / "r"],
         "cannot split the dense FFN's width 768 into equal experts"),
        (["train", *TINY, "--max-steps", 2, "--loss-weighting", "uw", "--results-dir", run, "--resume", "auto"],
         "trained with constant, and UW's learned weights are part of the optimiser state"),
    ]
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        cases.append((["train", *TINY, "--max-steps", 1, "--device", "mps", "--results-dir", tmp_path / "m"],
                      "no usable MPS device"))
    _each_refused_in_one_line(capsys, cases)
    # (a run that fails before writing anything, as the --cfg-channels 7 one inside training, leaves no folder)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c" / "runs").exists()
    assert not (tmp_path / "g.png").exists()
    capsys.readouterr()  # argparse's own errors: one line, not the usage block first
    with pytest.raises(SystemExit) as e:
        run_cli("train", "--lr", "abc")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == ("switch-dit train: error: argument --lr: invalid float value: 'abc' "
                                         "(see switch-dit train --help)")


def test_each_case_of_the_fourth_hostile_round_is_one_line(tmp_path, capsys):
    """Flags that were read and then dropped (sample --config/--preset, grid options with --num-fid-samples,
    --ddim-eta without DDIM, sampling flags of evaluate --npz, analyze's data options on a timestep-routed model) and
    a reference that cannot be read as asked (digits' test split, a path for built-in digits) are refused up front."""
    import numpy as np

    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", run) == 0
    ckpt = run / "checkpoints" / "step_0000001.pt"
    (tmp_path / "c.yaml").write_text("cfg_scale: 4.0\n")
    np.savez(tmp_path / "s.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    grid = ["sample", ckpt, "--num-sampling-steps", 2, "--out", tmp_path / "g.png"]
    fid = ["sample", ckpt, "--num-sampling-steps", 2, "--num-fid-samples", 4, "--out", tmp_path / "s4.npz"]
    ev = ["evaluate", "--npz", tmp_path / "s.npz", "--features", "fmnist-classifier", "--ref-data", "digits",
          "--cache-dir", tmp_path / "cache", "--no-progress"]
    _each_refused_in_one_line(capsys, [
        (grid + ["--config", tmp_path / "c.yaml"], "sample takes no --preset or --config"),
        (grid + ["--preset", "cpu-fashion"], "sample takes no --preset or --config"),
        (fid + ["--class-labels", 3], "grid options (--class-labels) do not apply to --num-fid-samples"),
        (fid + ["--per-class", 2, "--scale", 4, "--no-row-names"], "(--per-class, --scale, --no-row-names)"),
        (grid + ["--ddim-eta", 0.5], "--ddim-eta is DDIM's noise level; the sampler is ddpm"),
        (grid + ["--sampler", "dpm++", "--ddim-eta", 0.5], "the sampler is dpm++: add --sampler ddim"),
        (grid + ["--global-seed", 10 ** 20], "--global-seed must be in [-2^31, 2^32), got 100000000000000000000"),
        (ev + ["--sampler", "ddim", "--cfg-scale", 7], "--sampler, --cfg-scale set how a --ckpt model samples"),
        (ev + ["--compile"], "--compile set how a --ckpt model samples"),
        (ev + ["--ref-split", "test"], "--ref-split test: digits has no test split"),
        (ev + ["--ref-path", tmp_path], "digits is built in (scikit-learn) and reads no path"),
        (["analyze", ckpt, "--data", "digits", "--out", tmp_path / "an"], "--data: Switch-DiT-XS/2 routes by timestep"),
        (["analyze", ckpt, "--noise-schedule", "cosine", "--out", tmp_path / "an"], "--noise-schedule: Switch-DiT"),
    ])
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "s4.npz").exists() and not (tmp_path / "an").exists()
    assert run_cli("sample", *grid[1:], "--sampler", "ddim", "--ddim-eta", 0.5) == 0  # where it applies, it works
    assert run_cli("sample", *grid[1:], "--ddim-eta", 0) == 0  # (0, the default, is harmless with any sampler)
