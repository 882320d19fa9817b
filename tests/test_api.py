"""The Python API: load any format in one call, hub-style folders, a pipeline equal to the command line, class
names everywhere, a CLI that explains itself, and --resume auto that reads the run's own options."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import switch_dit
from tests.helpers import TINY, load_state, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    assert run_cli("train", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", d) == 0
    return d


def test_load_reads_every_format_to_the_same_model(run, tmp_path):
    ckpt = run / "checkpoints" / "step_0000002.pt"
    model = switch_dit.load(ckpt)
    assert model.step == 2 and model.config.model == "Switch-DiT-XS/2" and model.class_names[3] == "3"
    assert load_state(ckpt)["class_names"] == [str(i) for i in range(10)]  # stored in the checkpoint
    assert run_cli("export", ckpt, "--out", tmp_path / "m.safetensors") == 0
    model.save_pretrained(tmp_path / "folder")
    assert {p.name for p in (tmp_path / "folder").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, t, y).sample
        for other in (switch_dit.load(tmp_path / "m.safetensors"), switch_dit.load(tmp_path / "folder"),
                      switch_dit.DiT.from_pretrained(str(tmp_path / "folder"))):
            assert torch.equal(other(x, t, y).sample, want)
            assert other.class_names == model.class_names and other.step == 2
    with pytest.raises(ValueError, match="unknown option"):
        switch_dit.load(ckpt, modle="DiT-XS/2")
    # a variant spec, as --model takes: the recorded options agree, a contradicting one is refused
    k = model.config.top_k
    assert switch_dit.load(ckpt, model=f"Switch-DiT-XS/2:top_k={k}").config.top_k == k
    with pytest.raises(ValueError, match=rf"top_k={3 - k} \(the file records {k}\)"):
        switch_dit.load(ckpt, model=f"Switch-DiT-XS/2:top_k={3 - k}")
    with pytest.raises(ValueError, match=f"sets top_k={3 - k} but top_k={k} is given too"):
        switch_dit.load(ckpt, model=f"Switch-DiT-XS/2:top_k={3 - k}", top_k=k)
    # the folder is a model for every command too
    assert run_cli("sample", tmp_path / "folder", "--num-sampling-steps", 2, "--out", tmp_path / "g.png") == 0
    assert run_cli("export", ckpt, "--format", "folder", "--out", tmp_path / "f2") == 0
    assert json.loads((tmp_path / "f2" / "config.json").read_text())["step"] == 2


def test_the_shipped_model_loads_by_name_with_its_class_names():
    model = switch_dit.load("fashion-mnist")
    assert model.class_names[7] == "Sneaker" and model.config.sampler == "dpm++"


def test_pipeline_equals_the_command_line(run, tmp_path):
    ckpt = run / "checkpoints" / "step_0000002.pt"
    pipe = switch_dit.Pipeline.from_pretrained(str(ckpt))
    images = pipe(class_labels=[7, "3", 7, 1], num_inference_steps=3, guidance_scale=2.0, sampler="ddim",
                  generator=torch.Generator().manual_seed(4), output_type="np")
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    out = tmp_path / "cli.png"
    assert run_cli("sample", ckpt, "--class-labels", 7, 3, 7, 1, "--num-sampling-steps", 3, "--cfg-scale", 2,
                   "--sampler", "ddim", "--global-seed", 4, "--scale", 1, "--out", out) == 0
    from switch_dit.images import make_grid
    assert np.array_equal(np.asarray(Image.open(out))[..., None], make_grid(images, nrow=2))
    pil = pipe(class_labels=[0], num_inference_steps=2)
    assert isinstance(pil[0], Image.Image)
    # a tensor or array of indices is the list of them (it was 'unknown class tensor([...])')
    for labels in (torch.tensor([7, 3, 7, 1]), np.array([7, 3, 7, 1])):
        assert np.array_equal(pipe(class_labels=labels, num_inference_steps=3, guidance_scale=2.0, sampler="ddim",
                                   generator=torch.Generator().manual_seed(4), output_type="np"), images)
    with pytest.raises(ValueError, match="must hold class indices"):
        pipe(class_labels=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="unknown class 'sneakers'"):
        pipe(class_labels=["sneakers"])
    with pytest.raises(ValueError, match="out of range"):
        pipe(class_labels=[10])
    r = pipe.routing()
    assert r["kind"] == "timestep" and r["map"].shape == (1000, 18) and r["summary"]["num_blocks"] == 6


def test_pipeline_equals_the_command_line_for_a_batch_dependent_model(tmp_path, monkeypatch):
    """DiffMoE's samples depend on their batch: the command line's grids and Pipeline batch alike (32 by default, or
    --batch-size / batch_size), so they still agree beyond one batch."""
    import switch_dit.sample as sample_module
    from switch_dit.images import make_grid

    assert run_cli("train", *TINY, "--model", "DiffMoE-XS/2", "--max-steps", 2, "--ckpt-every", 2, "--results-dir",
                   tmp_path / "run") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    batches, real = [], sample_module.sample_latents
    monkeypatch.setattr(sample_module, "sample_latents",
                        lambda model, d, cfg, labels, *a: batches.append(len(labels)) or real(model, d, cfg, labels, *a))
    labels = [i % 10 for i in range(40)]
    pipe = switch_dit.Pipeline.from_pretrained(str(ckpt))
    common = ["--num-sampling-steps", 2, "--global-seed", 1, "--scale", 1, "--no-row-names"]
    for batch, want in ((None, [32, 8]), (40, [40]), (16, [16, 16, 8])):
        out = tmp_path / f"cli{batch}.png"
        batches.clear()
        assert run_cli("sample", ckpt, "--class-labels", *labels, *common, "--out", out,
                       *(["--batch-size", batch] if batch else [])) == 0
        images = pipe(class_labels=labels, num_inference_steps=2, seed=1, output_type="np",
                      **({"batch_size": batch} if batch else {}))
        assert batches == want + want, batch
        assert np.array_equal(np.asarray(Image.open(out))[..., None], make_grid(images, nrow=7)), batch
    batches.clear()
    assert run_cli("sample", ckpt, "--per-class", 5, *common, "--batch-size", 20, "--out", tmp_path / "g.png") == 0
    assert batches == [20, 20, 10]  # the class grid too
    for bad in ([], ()):
        with pytest.raises(ValueError, match="no class labels to sample"):
            pipe(class_labels=bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        pipe(class_labels=[1], batch_size=0)


def test_class_names_on_the_command_line_and_per_class_rows(tmp_path):
    out = tmp_path / "g.png"
    assert run_cli("sample", "--pretrained", "fashion-mnist", "--class-labels", "Sneaker", "ankle boot",
                   "--per-class", 3, "--num-sampling-steps", 2, "--scale", 1, "--out", out) == 0
    img = np.asarray(Image.open(out))
    assert img.shape[0] == 2 * 30 + 2  # two rows of 28-pixel tiles (2-pixel padding)
    assert img.shape[1] > 3 * 30 + 2  # and a margin with the class names on the left
    assert run_cli("sample", "--pretrained", "fashion-mnist", "--class-labels", "Sneakers", "--out", out) == 2


def test_sample_writes_a_png_folder_that_evaluate_reads_and_an_rgb_npz(run, tmp_path):
    ckpt = run / "checkpoints" / "step_0000002.pt"
    assert run_cli("sample", ckpt, "--num-fid-samples", 12, "--format", "png", "--num-sampling-steps", 2,
                   "--out", tmp_path / "pngs", "--no-progress") == 0
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == 12 and (tmp_path / "pngs" / "manifest.json").is_file()
    assert run_cli("evaluate", "--images", tmp_path / "pngs", "--image-size", 8, "--ref-data", "digits",
                   "--features", "fmnist-classifier", "--ref-limit", 20, "--k", 2, "--cache-dir", tmp_path / "c",
                   "--no-progress") == 0
    with np.load(tmp_path / "pngs.npz") as d:
        assert d["arr_0"].shape == (12, 8, 8, 3) and d["arr_1"].shape == (12,)  # grey repeated, as ADM reads
        assert (d["arr_0"][..., 0] == d["arr_0"][..., 2]).all()
    assert run_cli("sample", ckpt, "--num-fid-samples", 6, "--format", "png", "--out", tmp_path / "x.npz") == 2


def test_every_option_of_every_command_explains_itself(capsys):
    from switch_dit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction):
                assert a.help and len(a.help) > 8, (name, a.option_strings)
    sample = sub.choices["sample"]
    sampler = next(a for a in sample._actions if "--sampler" in a.option_strings)
    assert "dpm++" in sampler.help and "euler-maruyama" in sampler.help and "the checkpoint's" in sampler.help
    assert run_cli("presets") == 0
    assert "--preset cpu-fashion" in capsys.readouterr().out


def test_resume_auto_reads_the_runs_own_options(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--model", "DiT-XS/2", "--lr", "3e-4", "--max-steps", 2, "--ckpt-every", 2,
                   "--results-dir", out) == 0
    # no --model, --data or --lr: they come from the run's config.yaml; a flag given now still wins
    assert run_cli("train", "--results-dir", out, "--resume", "auto", "--max-steps", 3, "--no-progress") == 0
    state = load_state(out / "checkpoints" / "step_0000003.pt")
    assert state["config"]["model"] == "DiT-XS/2" and state["config"]["lr"] == 3e-4
    assert state["config"]["data"] == "digits" and state["step"] == 3
    assert "resuming with the options the run recorded" in capsys.readouterr().out


def test_config_from_run_resumes_with_the_runs_own_options(tmp_path, capsys):
    """Python resumes: Config.from_run(RUN, **changes) continues a run as 'train --resume auto' does; a plain
    Config(..., resume='auto') trains with its own values, defaults included, and says which differ."""
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--model", "DiT-XS/2", "--lr", "3e-4", "--max-steps", 2, "--ckpt-every", 1,
                   "--results-dir", out) == 0
    capsys.readouterr()
    cfg = switch_dit.Config.from_run(out, max_steps=3)
    assert (cfg.model, cfg.lr, cfg.global_batch_size, cfg.ckpt_every) == ("DiT-XS/2", 3e-4, 8, 1)
    assert (cfg.resume, cfg.results_dir) == ("auto", str(out))
    switch_dit.train(cfg, progress=False)
    assert "other than the checkpoint's: max_steps: checkpoint 2, now 3\n" in capsys.readouterr().out
    assert load_state(out / "checkpoints" / "step_0000003.pt")["config"]["global_batch_size"] == 8
    ckpt = out / "checkpoints" / "step_0000003.pt"  # a checkpoint: resume from it, in its own run folder
    assert (switch_dit.Config.from_run(ckpt).resume, switch_dit.Config.from_run(ckpt).results_dir) == (str(ckpt), str(out))
    switch_dit.train(switch_dit.Config(model="DiT-XS/2", data="digits", image_size=8, lr=3e-4, results_dir=str(out),
                                       resume="auto", max_steps=4, tensorboard=False), progress=False)
    said = capsys.readouterr().out
    assert "global_batch_size: checkpoint 8, now 256" in said and "log_every: checkpoint 1, now 100" in said
    elsewhere = switch_dit.Config.from_run(out, results_dir=str(tmp_path / "e"))  # continued in another folder:
    assert elsewhere.resume == str(out / "checkpoints" / "step_0000004.pt")  # from this run's newest checkpoint
    for bad in (tmp_path / "none", tmp_path):
        with pytest.raises(ValueError, match="is no run"):
            switch_dit.Config.from_run(bad)
    loose = tmp_path / "step.pt"  # a checkpoint outside its run: where to continue must be said
    loose.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="give results_dir="):
        switch_dit.Config.from_run(loose)
    assert switch_dit.Config.from_run(loose, results_dir=str(tmp_path / "c")).model == "DiT-XS/2"
    with pytest.raises(ValueError, match="unknown option"):
        switch_dit.Config.from_run(out, max_step=5)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of the README's Python API section runs as written (in a scratch folder)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README


def test_review_findings_stay_fixed(run, tmp_path, capsys):
    """An unseeded generator, overrides at load time, a model spec on resume, a config.yaml named by --config."""
    ckpt = run / "checkpoints" / "step_0000002.pt"
    pipe = switch_dit.Pipeline.from_pretrained(str(ckpt), cfg_scale=3.0, sampler="ddim", num_sampling_steps=4)
    assert (pipe.config.cfg_scale, pipe.config.sampler, pipe.config.num_sampling_steps) == (3.0, "ddim", 4)
    assert pipe(class_labels=[1], generator=torch.Generator(), output_type="np").shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="top_k=1 .*records 2"):
        switch_dit.load(ckpt, top_k=1)
    with pytest.raises(ValueError, match="image_size=16 .*records 8"):  # the file's own size, not ignored
        switch_dit.load(ckpt, image_size=16)
    assert switch_dit.load(ckpt, image_size=8).config.image_size == 8
    assert run_cli("sample", ckpt, "--image-size", 7, "--out", tmp_path / "g7.png") == 2
    assert "image_size=7 (the file records 8)" in capsys.readouterr().err
    # a model spec on --resume is the same model, not a clash
    out = tmp_path / "spec"
    spec = ["--model", "Switch-DiT-XS/2:lambda_dp=0.5", "--max-steps"]
    assert run_cli("train", *TINY, *spec, 1, "--ckpt-every", 1, "--results-dir", out) == 0
    assert run_cli("train", *TINY, *spec, 2, "--ckpt-every", 1, "--results-dir", out, "--resume", "auto") == 0
    # --resume auto finds the run folder a --config YAML names
    (tmp_path / "c.yaml").write_text(f"results_dir: {out}\n")
    capsys.readouterr()
    assert run_cli("train", "--config", tmp_path / "c.yaml", "--resume", "auto", "--max-steps", 3,
                   "--no-progress") == 0
    assert load_state(out / "checkpoints" / "step_0000003.pt")["config"]["lambda_dp"] == 0.5
    assert run_cli("sample", ckpt, "--global-seed", 2 ** 40) == 2  # seeds must fit: one line, not an overflow


def test_config_takes_a_variant_spec_as_the_command_line_does():
    """Config(model="NAME:option=value,...") sets those options, as --model and compare's --variants do; an option
    also given to Config with another value, or twice in the spec, is a one-line error."""
    from switch_dit.config import Config

    cfg = Config(model="TC-MoE-XS/4:moe_experts=4,moe-shared=0").validate()
    assert (cfg.model, cfg.moe_experts, cfg.moe_shared) == ("TC-MoE-XS/4", 4, 0)
    assert Config(model="TC-MoE-XS/4:moe_experts=4", moe_experts=4).validate().moe_experts == 4
    for kw, words in ((dict(model="TC-MoE-XS/4:moe_experts=4", moe_experts=6), "moe_experts=6 is given too"),
                      (dict(model="TC-MoE-XS/4:moe_experts=4,moe_experts=5"), "moe_experts is given twice"),
                      (dict(model="TC-MoE-XS/4:bogus=1"), "'bogus=1' is not option=value"),
                      (dict(model="DiT-XS/4:moe_experts=4"), "applies to TC-MoE, EC-MoE and DiffMoE only")):
        with pytest.raises(ValueError, match=words):
            Config(**kw).validate()


def test_pipeline_refuses_ambiguous_or_mistyped_arguments_in_its_own_words(run):
    pipe = switch_dit.Pipeline.from_pretrained(str(run / "checkpoints" / "step_0000002.pt"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        pipe(class_labels=[1], generator=0)
    with pytest.raises(ValueError, match="generator or seed, not both"):
        pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), seed=1)
    with pytest.raises(ValueError, match="^num_inference_steps must be >= 1"):
        pipe(class_labels=[1], num_inference_steps=0)
    with pytest.raises(ValueError, match="^guidance_scale must be a finite number"):
        pipe(class_labels=[1], guidance_scale=float("nan"))
    for bins in (0, -1, 2.5, True, 100000):
        with pytest.raises(ValueError, match="num_bins must be a whole number between 1 and 1000"):
            pipe.routing(num_bins=bins)
    binned = pipe.routing(num_bins=1000)["binned"]  # (blocks, bins, experts): one bin per timestep is the most
    assert binned.shape[1] == 1000 and np.isfinite(binned).all()
