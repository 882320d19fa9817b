import os

import numpy as np
import pytest
import torch

from switch_dit import create_model
from switch_dit.sample import load_model_for_sampling, sample_npz
from tests.helpers import TINY, dist_env, run_cli, run_processes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", *TINY, "--max-steps", 4, "--ckpt-every", 4, "--results-dir", out) == 0
    return out / "checkpoints" / "step_0000004.pt"


def test_grid_same_seed_same_image(trained, tmp_path):
    from PIL import Image

    args = ["sample", trained, "--num-sampling-steps", 5, "--cfg-scale", 2.0, "--no-progress", "--scale", 1,
            "--no-row-names"]
    assert run_cli(*args, "--out", tmp_path / "a.png") == 0
    assert run_cli(*args, "--out", tmp_path / "b.png") == 0
    assert run_cli(*args, "--out", tmp_path / "c.png", "--global-seed", 1) == 0
    # DiT's flag: --ckpt PATH is the same as the positional path
    assert run_cli("sample", "--ckpt", *args[1:], "--out", tmp_path / "d.png") == 0
    a, b, c, d = (np.array(Image.open(tmp_path / f"{n}.png")) for n in "abcd")
    assert a.shape == (2 + 10 * 10, 2 + 8 * 10)  # 10 class rows, 8 columns of 8x8 images, 2-px padding
    assert np.array_equal(a, b) and not np.array_equal(a, c) and np.array_equal(a, d)
    assert run_cli("sample", "--num-sampling-steps", 2) == 2  # no checkpoint at all: a one-line error


def test_npz_format(trained, tmp_path):
    assert run_cli("sample", trained, "--num-fid-samples", 10, "--batch-size", 4, "--num-sampling-steps", 3,
                   "--out", tmp_path / "s.npz", "--no-progress") == 0
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].shape == (10, 8, 8, 3) and d["arr_0"].dtype == np.uint8  # grey repeated, as ADM reads
        assert (d["arr_0"][..., :1] == d["arr_0"]).all()
        assert d["arr_1"].shape == (10,) and d["arr_1"].max() < 10


def _npz_worker(rank, world, port, ckpt, out):
    dist_env(rank, world, port)
    model, cfg, _ = load_model_for_sampling(ckpt)
    cfg.num_sampling_steps, cfg.device = 3, "cpu"
    sample_npz(model, cfg, 10, out, batch_size=4, progress=False)


def test_npz_identical_with_one_or_two_processes_and_resumes(trained, tmp_path):
    model, cfg, _ = load_model_for_sampling(trained)
    cfg.num_sampling_steps, cfg.device = 3, "cpu"
    one = tmp_path / "one.npz"
    sample_npz(model, cfg, 10, one, batch_size=4, progress=False)
    run_processes(_npz_worker, 2, str(trained), str(tmp_path / "two.npz"))
    with np.load(one) as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        first = a["arr_0"].copy()
    # Interrupted run: one part is missing; the rerun makes only that part and no duplicates.
    parts = tmp_path / "one.npz.parts"
    (parts / "000000004.npz").unlink()
    os.unlink(one)
    before = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    sample_npz(model, cfg, 10, one, batch_size=4, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before
    with np.load(one) as a:
        assert np.array_equal(a["arr_0"], first) and len(a["arr_0"]) == 10


def test_a_rerun_never_shows_another_process_a_half_written_manifest(trained, tmp_path, monkeypatch):
    """Under torchrun every process reads OUT.parts/manifest.json to check its settings while process 0 rewrites it:
    the rewrite is atomic, so a reader sees a whole manifest (process 1 once read an empty file, failed with a JSON
    error only it could print, and process 0 reported a lost connection)."""
    import json
    import pathlib

    model, cfg, _ = load_model_for_sampling(trained)
    cfg.num_sampling_steps, cfg.device = 2, "cpu"
    out, manifest = tmp_path / "s.npz", {"sampler": "test", "steps": 2}
    sample_npz(model, cfg, 4, out, batch_size=4, progress=False, manifest=manifest)
    seen, write_text = [], pathlib.Path.write_text

    def caught_midway(self, data, *args, **kwargs):
        if "manifest" in self.name:
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            seen.append(json.loads((tmp_path / "s.npz.parts" / "manifest.json").read_text()))  # what a reader gets
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", caught_midway)
    sample_npz(model, cfg, 4, out, batch_size=4, progress=False, manifest=manifest)
    assert seen == [manifest]
    assert json.loads((tmp_path / "s.npz.parts" / "manifest.json").read_text()) == manifest


def test_loads_a_plain_dit_state_dict(tmp_path):
    model = create_model("DiT-XS/2", input_size=8, in_channels=4, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    assert run_cli("sample", tmp_path / "dit.pt", "--model", "DiT-XS/2", "--num-sampling-steps", 2,
                   "--class-labels", 1, 2, 3, "--out", tmp_path / "g.png", "--no-progress") == 0
    assert (tmp_path / "g.png").exists()
    assert run_cli("sample", tmp_path / "dit.pt", "--model", "DiT-S/2", "--out", tmp_path / "h.png",
                   "--no-progress") != 0
