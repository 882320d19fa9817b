"""switch-dit export: EMA weights as safetensors with the config in the metadata; sample/analyze/evaluate take it."""
import json

import numpy as np
import pytest
import torch

from switch_dit.checkpoint import CheckpointError, load_exported
from switch_dit.sample import load_model_for_sampling
from tests.helpers import TINY, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", out) == 0
    return out / "checkpoints" / "step_0000002.pt"


def test_export_roundtrip_and_commands(trained, tmp_path, capsys):
    from PIL import Image

    exported = tmp_path / "model.safetensors"
    assert run_cli("export", trained, "--out", exported) == 0
    weights, meta = load_exported(exported)
    assert meta["format"] == "switch-dit/model/1" and meta["step"] == 2 and meta["config"]["model"] == "Switch-DiT-XS/2"
    a, _, _ = load_model_for_sampling(str(trained))
    b, cfg, step = load_model_for_sampling(str(exported))
    assert step == 2 and cfg.model == "Switch-DiT-XS/2"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    args = ["--num-sampling-steps", 2, "--no-progress"]
    assert run_cli("sample", trained, *args, "--out", tmp_path / "a.png") == 0
    assert run_cli("sample", "--ckpt", exported, *args, "--out", tmp_path / "b.png") == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), np.array(Image.open(tmp_path / "b.png")))
    assert run_cli("analyze", exported, "--out", tmp_path / "an") == 0
    assert run_cli("evaluate", "--ckpt", exported, "--num-samples", 10, "--num-sampling-steps", 2, "--ref-data",
                   "digits", "--ref-limit", 50, "--cache-dir", tmp_path, "--out", tmp_path / "r.json",
                   "--no-progress") == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 10
    # half precision: half the size, the same model up to rounding
    assert run_cli("export", trained, "--out", tmp_path / "h.safetensors", "--dtype", "float16") == 0
    h, _ = load_exported(tmp_path / "h.safetensors")
    assert all(torch.allclose(h[k], weights[k], atol=1e-3, rtol=1e-3) for k in weights)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * exported.stat().st_size


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    for args, words in ((["sample", tmp_path / "plain.safetensors"], "without switch-dit metadata"),
                        (["export", trained, "--out", tmp_path / "x.pt"], "must end in .safetensors"),
                        (["sample", "--pretrained", "fashion-mnist", "--ckpt", trained], "give the model once")):
        capsys.readouterr()
        assert run_cli(*args) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_exported(tmp_path / "none.safetensors")
