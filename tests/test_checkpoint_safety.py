"""Loading never runs code from a file; other code's checkpoints (the authors', DiT's) load by their tensors."""
import os

import pytest
import torch

from switch_dit import create_model
from switch_dit.checkpoint import CheckpointError, UnloadedObject, load
from switch_dit.sample import load_model_for_sampling
from tests.conftest import randomize_
from tests.helpers import TINY, run_cli


class _Payload:
    """A pickle that runs a shell command when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _authors_state(model) -> dict:
    """Our Switch-DiT state dict in the authors' naming, with the extra buffers their code stores."""
    out = {}
    for k, v in model.state_dict().items():
        if ".router." in k:
            block, name = k.split(".router.")
            i = block.split(".")[1]
            new = {"gate.1.weight": "f_gate.1.weight", "gate.1.bias": "f_gate.1.bias", "expert_weight": "experts.w",
                   "expert_bias": "experts.b"}[name]
            out[f"routers.{i}.{new}"] = v.clone()
            out[f"routers.{i}._unit_mapping"] = torch.rand(1000, v.shape[-1]) if name == "expert_bias" else None
        else:
            out[k] = v.clone()
    out = {k: v for k, v in out.items() if v is not None}
    out["full_time"] = torch.arange(1000)
    out["prior._unit_mapping"] = torch.rand(1000, 18)
    return out


def test_a_checkpoint_that_runs_code_is_refused_everywhere(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"format": "switch-dit/train-state/1", "model": {}, "x": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="refers to code .*system.*nothing in it was run"):
        load(bad)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"x": _Payload(marker)}, run / "checkpoints" / "step_0000001.pt")
    for args in (["sample", bad], ["analyze", bad], ["evaluate", "--ckpt", bad],
                 ["train", *TINY, "--max-steps", 2, "--results-dir", run, "--resume", "auto"]):
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert "refers to code" in err and len(err.splitlines()) == 1, (args, err)
    assert not marker.exists()


def test_a_yaml_config_with_python_tags_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    for text in (f'model: !!python/object/apply:os.system ["touch {marker}"]\n',
                 f'max_steps: 2\nlr: !!python/object/new:os.system ["touch {marker}"]\n'):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        capsys.readouterr()
        assert run_cli("train", *TINY, "--config", cfg, "--results-dir", tmp_path / "run") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bad.yaml" in err, err
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_authors_switch_dit_checkpoint_with_omegaconf_config_loads(tmp_path):
    import omegaconf  # installed by the test extras; the loader never imports it
    model = randomize_(create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=10)).eval()
    cfg = omegaconf.OmegaConf.create({"routing": {"name": "DMoE", "param": {"k": 2, "num_experts": 3}},
                                      "general": {"image_size": 8}})
    path = tmp_path / "0400000.pt"
    state = _authors_state(model)
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "ema": state, "opt": {}, "config": cfg}, path)
    raw = load(path)
    assert isinstance(raw["config"], UnloadedObject) and "DictConfig" in repr(raw["config"])
    ours, run_cfg, _ = load_model_for_sampling(str(path), cfg_overrides=_cfg("Switch-DiT-XS/4"))
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(ours(x, t, y).sample, model(x, t, y).sample)
    assert run_cfg.num_experts == 3
    with pytest.raises(CheckpointError, match="holds a Switch-DiT model, not DiT-XS/4: pass --model Switch-DiT-XS/4"):
        load_model_for_sampling(str(path), cfg_overrides=_cfg("DiT-XS/4"))
    assert run_cli("sample", "--ckpt", path, "--model", "Switch-DiT-XS/4", "--num-sampling-steps", 2,
                   "--out", tmp_path / "g.png", "--no-progress") == 0
    assert run_cli("analyze", path, "--model", "Switch-DiT-XS/4", "--out", tmp_path / "an") == 0
    assert (tmp_path / "an" / "routing.json").exists()


def test_authors_dtr_checkpoint_loads(tmp_path):
    model = randomize_(create_model("DTR-XS/4", input_size=8, in_channels=1, num_classes=10)).eval()
    state = dict(model.state_dict())
    state.update({f"routers.{i}._unit_mapping": torch.rand(1000, 192) for i in range(6)})
    torch.save({"ema": state}, tmp_path / "dtr.pt")
    ours, _, _ = load_model_for_sampling(str(tmp_path / "dtr.pt"), cfg_overrides=_cfg("DTR-XS/4"))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(ours(x, t, y).sample, model(x, t, y).sample)


def _cfg(name):
    from switch_dit.config import Config
    return Config(model=name, image_size=8)


def test_a_latent_model_of_other_code_saved_as_a_folder_loads_again(tmp_path):
    """A foreign latent DiT loaded without a VAE records its pixel image size (64 for 8x8 latents): its folder is not
    'edited' for that (the image-size check is for pixel models); a pixel model's is."""
    import argparse
    import json

    import switch_dit

    model = create_model("DiT-XS/2", input_size=8, in_channels=4, num_classes=10)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": argparse.Namespace(image_size=64)},
               tmp_path / "dit.pt")
    switch_dit.load(tmp_path / "dit.pt", model="DiT-XS/2").save_pretrained(tmp_path / "folder")
    assert switch_dit.load(tmp_path / "folder").config.image_size == 64
    pixel = create_model("DiT-XS/2", input_size=8, in_channels=1, num_classes=10)
    torch.save({"model": pixel.state_dict(), "ema": pixel.state_dict(), "args": argparse.Namespace(image_size=8)},
               tmp_path / "pix.pt")
    switch_dit.load(tmp_path / "pix.pt", model="DiT-XS/2").save_pretrained(tmp_path / "pix")
    cfg = json.loads((tmp_path / "pix" / "config.json").read_text())
    cfg["config"]["image_size"] = 16
    (tmp_path / "pix" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="claims config image_size 16 \\(the weights say 8\\)"):
        switch_dit.load(tmp_path / "pix")
