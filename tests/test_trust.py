"""Numbers a user can trust from their own runs: sample sets keyed by what they sample, evaluation defaults that fit
the model's data and say what they measured, and foreign checkpoints sampled as their authors sampled them."""
import json

import numpy as np
import pytest
import torch

import switch_dit
from switch_dit import create_model
from switch_dit.checkpoint import export_model
from tests.conftest import randomize_
from tests.helpers import TINY, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    assert run_cli("train", *TINY, "--model", "DiT-XS/2", "--max-steps", 2, "--ckpt-every", 1,
                   "--results-dir", d) == 0
    return d / "checkpoints"


def _npz(tiny, out, *extra):
    return run_cli("sample", tiny / "step_0000002.pt", "--num-fid-samples", 6, "--batch-size", 4,
                   "--num-sampling-steps", 2, "--out", out, "--no-progress", *extra)


# Each option that changes the samples, and its (flag, value) on a rerun into the same --out.
CHANGES = [("cfg_scale", ["--cfg-scale", "3"]), ("sampler", ["--sampler", "ddim"]),
           ("num_sampling_steps", ["--num-sampling-steps", "3"]), ("global_seed", ["--global-seed", "5"]),
           ("ema", ["--no-ema"]), ("cfg_channels", ["--cfg-channels", "1"]), ("num_samples", ["--num-fid-samples", "7"]),
           ("batch_size", ["--batch-size", "2"]), ("noise_schedule", ["--noise-schedule", "cosine"]),
           ("model_sha256", None)]


@pytest.fixture(scope="module")
def drawn(tiny, tmp_path_factory):
    """One sample set, drawn once; each case below starts from a copy of it (resumed, not redrawn)."""
    d = tmp_path_factory.mktemp("drawn")
    assert _npz(tiny, d / "s.npz") == 0
    return d


def test_a_rerun_with_the_same_settings_resumes(tiny, drawn, tmp_path):
    import shutil

    shutil.copytree(drawn, tmp_path, dirs_exist_ok=True)
    parts = sorted((tmp_path / "s.npz.parts").glob("0*.npz"))
    stamp = [p.stat().st_mtime_ns for p in parts]
    assert _npz(tiny, tmp_path / "s.npz") == 0  # the same settings: resumed, nothing redrawn
    assert [p.stat().st_mtime_ns for p in parts] == stamp
    with np.load(tmp_path / "s.npz") as d:
        manifest = json.loads(str(d["manifest"]))
    assert manifest["provenance"]["model_file"].endswith(".pt") and len(manifest["model_sha256"]) == 64


@pytest.mark.parametrize("field,flags", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_sample_set_is_resumed_only_with_the_settings_that_made_it(tiny, drawn, tmp_path, capsys, field, flags):
    import shutil

    shutil.copytree(drawn, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "s.npz"
    first = np.load(out)["arr_0"]
    capsys.readouterr()
    if flags is None:  # another checkpoint of the same model
        rerun = lambda *x: run_cli("sample", tiny / "step_0000001.pt", "--num-fid-samples", 6, "--batch-size", 4,  # noqa
                                   "--num-sampling-steps", 2, "--out", out, "--no-progress", *x)
    else:
        rerun = lambda *x: _npz(tiny, out, *flags, *x)  # noqa: E731
    assert rerun() == 2
    err = capsys.readouterr().err
    assert "holds samples drawn with other settings" in err and field in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert np.array_equal(np.load(out)["arr_0"], first)  # nothing mixed in
    if field in ("cfg_scale", "model_sha256"):  # --overwrite draws the new set (two cases suffice: it is one code path)
        with np.load(out) as d:
            old = json.loads(str(d["manifest"]))
        assert rerun("--overwrite") == 0
        with np.load(out) as d:
            new = json.loads(str(d["manifest"]))
        assert new[field] != old[field]  # the set on disk is now the one these settings draw


def test_sample_output_names_must_fit_the_format(tiny, tmp_path):
    assert _npz(tiny, tmp_path / "x.png") == 2
    assert run_cli("sample", tiny / "step_0000002.pt", "--num-sampling-steps", 2, "--out", tmp_path / "g.npz") == 2
    (tmp_path / "dir.png").mkdir()
    assert run_cli("sample", tiny / "step_0000002.pt", "--num-sampling-steps", 2, "--out", tmp_path / "dir.png") == 2


def _noise_npz(path, n, size, channels, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, arr_0=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))
    return path


@pytest.mark.parametrize("data,channels", [("fashion-mnist", 1), ("digits", 1), ("folder", 3)])
def test_uniform_noise_is_outside_the_data_manifold_with_the_default_features(tmp_path, capsys, data, channels):
    from switch_dit.evaluate.features import default_features

    args = ["--ref-data", data, "--ref-limit", 60, "--no-progress", "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "r.json"]
    if data == "folder":
        from PIL import Image
        rng = np.random.default_rng(1)
        for c in range(2):
            (tmp_path / "ref" / f"c{c}").mkdir(parents=True)
            for i in range(30):  # smooth colour blobs: images with structure, unlike the noise
                img = np.zeros((16, 16, 3), np.uint8)
                img[4 + c * 4: 12, 3:13] = rng.integers(60, 255, 3)
                Image.fromarray(img).save(tmp_path / "ref" / f"c{c}" / f"{i}.png")
        args += ["--ref-path", tmp_path / "ref"]
    npz = _noise_npz(tmp_path / "noise.npz", 60, 16, channels)
    assert run_cli("evaluate", "--npz", npz, *args) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["feature_network"]["name"] == default_features(data)
    assert res["precision"] <= 0.1 and res["recall"] <= 0.1, res
    assert "warning" in res and "fewer than" in res["warning"]  # 60 samples < the feature dimension


def test_evaluate_takes_the_checkpoints_own_data_and_records_what_it_measured(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run_cli("evaluate", "--ckpt", tiny / "step_0000002.pt", "--num-samples", 20, "--num-sampling-steps", 2,
                   "--features", "fmnist-classifier", "--ref-limit", 50, "--cache-dir", tmp_path / "c",
                   "--no-progress", "--out", out) == 0
    err = capsys.readouterr().err
    assert "reference: digits" in err and "the checkpoint's training data" in err
    res = json.loads(out.read_text())
    ref = res["reference"]
    assert (ref["data"], ref["split"], ref["num"], ref["subset"]) == ("digits", "train", 50, "seeded random (seed 0)")
    s = res["samples"]
    assert s["source"] == "checkpoint" and s["step"] == 2 and len(s["model_sha256"]) == 64
    assert (s["sampler"], s["num_sampling_steps"], s["cfg_scale"], s["num_samples"]) == ("ddpm", 2, 1.5, 20)
    assert res["feature_network"]["name"] == "fmnist-classifier" and res["package_version"] and res["date"]
    # an .npz without a manifest names no data: the reference must be given
    assert run_cli("evaluate", "--npz", _noise_npz(tmp_path / "n.npz", 10, 8, 1)) == 2
    assert "--ref-data" in capsys.readouterr().err
    for bad in (["--ref-limit", 0], ["--ref-limit", -3], ["--k", 0]):
        assert run_cli("evaluate", "--npz", tmp_path / "n.npz", "--ref-data", "digits", *bad) == 2


def test_ref_limit_is_a_seeded_random_subset():
    from switch_dit.data.datasets import DigitsDataset
    from switch_dit.evaluate.run import reference_images
    from switch_dit.images import to_uint8

    a = reference_images("digits", None, "train", 8, 100)
    assert np.array_equal(a, reference_images("digits", None, "train", 8, 100))
    first = to_uint8(DigitsDataset(8).images[:100])
    assert a.shape == first.shape and not np.array_equal(a, first)


def _authors_checkpoint(model, path, schedule):
    import omegaconf

    from tests.test_checkpoint_safety import _authors_state

    cfg = omegaconf.OmegaConf.create({"general": {"image_size": 8, "schedule_name": schedule},
                                      "models": {"name": "DiT-XS/4"}, "routing": {"name": "DMoE",
                                      "param": {"k": 2, "num_experts": 3}}, "eval": {"cfg_scale": 1.5}})
    torch.save({"ema": _authors_state(model), "config": cfg}, path)


def test_an_authors_checkpoint_samples_with_its_recorded_schedule(tmp_path):
    """The authors' checkpoint with a cosine config (no --model needed) samples bit-identically to the same
    weights in our format with cosine; --noise-schedule overrides."""
    from switch_dit.config import Config
    import dataclasses

    model = randomize_(create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=10)).eval()
    _authors_checkpoint(model, tmp_path / "authors.pt", "cosine")
    cfg = Config(model="Switch-DiT-XS/4", image_size=8, noise_schedule="cosine", data="digits")
    state = {"config": dataclasses.asdict(cfg), "ema": model.state_dict(), "step": 7, "in_channels": 1,
             "input_size": 8, "num_classes": 10}
    export_model(state, tmp_path / "ours.safetensors")
    grids = {}
    for name, extra in (("authors", []), ("ours", []), ("linear", ["--noise-schedule", "linear"])):
        src = tmp_path / ("ours.safetensors" if name == "ours" else "authors.pt")
        out = tmp_path / f"{name}.png"
        assert run_cli("sample", src, "--num-sampling-steps", 3, "--per-class", 1, "--out", out, *extra) == 0
        from PIL import Image
        grids[name] = np.asarray(Image.open(out))
    assert np.array_equal(grids["authors"], grids["ours"])
    assert not np.array_equal(grids["authors"], grids["linear"])


def test_a_one_class_dit_state_dict_keeps_its_null_row(tmp_path):
    model = randomize_(create_model("DiT-XS/4", input_size=8, in_channels=1, num_classes=1,
                                    class_dropout_prob=0.1))
    assert model.y_embedder.embedding_table.weight.shape[0] == 2  # 1 class + the null class, as Meta's DiT
    torch.save(model.state_dict(), tmp_path / "one.pt")
    assert run_cli("sample", tmp_path / "one.pt", "--model", "DiT-XS/4", "--num-sampling-steps", 2,
                   "--cfg-scale", 2, "--out", tmp_path / "g.png") == 0


def test_a_bare_switch_dit_takes_a_top_k_its_own_experts_allow(tmp_path):
    """The tensors' number of experts is set before the options are checked: top_k=4 fits weights of 6 experts
    (it was refused against the default 3), and a top_k above them is refused against the weights' 6."""
    model = create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=10, num_experts=6, top_k=4)
    torch.save(model.state_dict(), tmp_path / "six.pt")
    loaded = switch_dit.load(tmp_path / "six.pt", model="Switch-DiT-XS/4", top_k=4)
    assert (loaded.config.num_experts, loaded.config.top_k) == (6, 4)
    with pytest.raises(ValueError, match="--num-experts=6"):
        switch_dit.load(tmp_path / "six.pt", model="Switch-DiT-XS/4", top_k=7)


@pytest.mark.parametrize("name", ["Switch-DiT-XS/4", "DTR-XS/4", "TC-MoE-XS/4", "EC-MoE-XS/4"])
def test_a_bare_state_dict_in_our_names_loads_with_model(tmp_path, name, capsys):
    from switch_dit.loading import load_model
    from switch_dit.config import Config

    opts = dict(moe_experts=4, moe_shared=2, moe_top_k=1) if "MoE" in name else {}
    model = randomize_(create_model(name, input_size=8, in_channels=1, num_classes=10, **opts)).eval()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    ours, cfg, _ = load_model(str(tmp_path / "bare.pt"), cfg_overrides=Config(model=name, image_size=8))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(ours(x, t, y).sample, model(x, t, y).sample)
    if "MoE" in name:  # the mixture's sizes come from the tensors
        assert (cfg.moe_experts, cfg.moe_shared, cfg.moe_top_k) == (4, 2, 1)
        # an explicit value the tensors contradict is refused, not replaced; the same value, or a spec, is fine
        with pytest.raises(ValueError, match=r"moe_top_k=2 \(the weights have 1\)"):
            switch_dit.load(tmp_path / "bare.pt", model=name, moe_top_k=2)
        assert switch_dit.load(tmp_path / "bare.pt", model=f"{name}:moe_shared=2").config.moe_shared == 2
    # a pixel model's image size is its position embedding's: set when not given, refused when contradicted
    assert cfg.image_size == 8 and switch_dit.load(tmp_path / "bare.pt", model=name).config.image_size == 8
    with pytest.raises(ValueError, match="image_size=16 .the position embedding is for 8 x 8 images"):
        switch_dit.load(tmp_path / "bare.pt", model=name, image_size=16)
    assert run_cli("sample", tmp_path / "bare.pt", "--model", name, "--image-size", 16, "--out",
                   tmp_path / "i.png") == 2
    if name == "DTR-XS/4":  # nor does it record its training data: evaluate asks what to compare with
        assert run_cli("evaluate", "--ckpt", tmp_path / "bare.pt", "--model", name, "--num-samples", 10) == 2
        assert "say what to compare the samples with" in capsys.readouterr().err
        assert run_cli("evaluate", "--ckpt", tmp_path / "bare.pt", "--model", "DiT-S/4", "--ref-data", "digits") == 2
        assert "holds a model of depth" in capsys.readouterr().err  # --model reaches the loader
        assert run_cli("sample", tmp_path / "bare.pt", "--model", name, "--num-fid-samples", 10, "--num-sampling-steps",
                       2, "--out", tmp_path / "s.npz", "--no-progress") == 0
        with np.load(tmp_path / "s.npz") as d:
            assert json.loads(str(d["manifest"]))["provenance"]["data"] is None
        assert run_cli("evaluate", "--npz", tmp_path / "s.npz") == 2
        assert "say what to compare the samples with" in capsys.readouterr().err
        assert run_cli("evaluate", "--npz", tmp_path / "s.npz", "--vae", tmp_path) == 2  # (images need no VAE)
        for cmd in (["evaluate", "--ckpt"], ["sample"]):  # nor does a pixel model
            assert run_cli(*cmd, tmp_path / "bare.pt", "--model", name, "--vae", tmp_path, "--out", tmp_path / "v.png") == 2
            assert "images, not latents: --vae does not apply" in capsys.readouterr().err
        latent = create_model("DiT-XS/4", input_size=8, in_channels=4, num_classes=10)
        torch.save(latent.state_dict(), tmp_path / "latent.pt")  # a latent model without a VAE: said up front
        assert run_cli("evaluate", "--ckpt", tmp_path / "latent.pt", "--model", "DiT-XS/4", "--ref-data",
                       "digits", "--num-samples", 10) == 2
        assert "4-channel latents and records no VAE" in capsys.readouterr().err
        switch_dit.load(tmp_path / "bare.pt", model=name).save_pretrained(tmp_path / "folder")  # nor its card
        card = (tmp_path / "folder" / "README.md").read_text()
        assert "are not recorded" in card and "trained with" not in card
    assert run_cli("sample", tmp_path / "bare.pt", "--model", name, "--num-sampling-steps", 2,
                   "--out", tmp_path / "g.png") == 0
    other = "DiT-XS/4" if name != "DTR-XS/4" else "Switch-DiT-XS/4"
    assert run_cli("sample", tmp_path / "bare.pt", "--model", other, "--out", tmp_path / "h.png") == 2
