"""The GPU benchmark runs its whole code path on the CPU at tiny sizes, so it cannot rot before a GPU is at hand."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_bench_gpu_tiny_on_cpu(tmp_path):
    import bench_gpu

    res = bench_gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--compile-backend", "eager",
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["train"] == json.loads(json.dumps(res["train"]))
    assert {(r["model"], r["compiled"]) for r in res["train"]} == {
        (m, c) for m in ("DiT-XS/4", "Switch-DiT-XS/4") for c in (False, True)}
    for r in res["train"]:
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0 and 0 < r["mfu"]
    switch = next(r for r in res["train"] if r["model"] == "Switch-DiT-XS/4")
    dit = next(r for r in res["train"] if r["model"] == "DiT-XS/4")
    assert switch["flops_per_step"] > dit["flops_per_step"]  # the experts and the prior cost FLOPs
    assert len(res["sample"]) == 2 and all(r["images_per_s"] > 0 for r in res["sample"])
    assert "Switch-DiT-XS/4 / DiT-XS/4 train step (compiled)" in res["ratios"]
    assert res["vae"]["images_per_s"] > 0
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| Switch-DiT-XS/4 | yes | 4 |" in table and "host syncs / step" in table


def test_bench_samplers_runs_every_sampler_on_the_same_samples(tmp_path):
    import json

    import bench_samplers

    from tests.helpers import TINY, run_cli

    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", run) == 0
    out = tmp_path / "o"

    def bench(*args):
        return bench_samplers.main(["--ckpt", str(run / "checkpoints" / "step_0000001.pt"), "--num-samples", "12",
                                    "--batch-size", "6", "--device", "cpu", "--out", str(out), *args])

    def settings(runs):
        return [(r["sampler"], r["steps"]) for r in runs]

    res = bench("--max-steps", "10")
    assert settings(res["runs"]) == [("ddim", 10), ("dpm++", 10)]
    assert all(r["fid"] > 0 and r["ms_per_image"] > 0 for r in res["runs"])
    assert (out / "fid_vs_steps.png").is_file() and "| dpm++ | 10 |" in (out / "bench_samplers.md").read_text()
    # a rerun with more steps keeps what was measured and adds the rest
    again = bench("--max-steps", "20")
    assert settings(again["runs"]) == [("ddim", 10), ("ddim", 20), ("dpm++", 10), ("dpm++", 20)]
    assert again["runs"][0] == res["runs"][0] and again["runs"][2] == res["runs"][1]
    assert "Not measured yet: ddpm 50, ddpm 250, ddim 50" in (out / "bench_samplers.md").read_text()
    # killed right after its first new setting (DDPM-50 comes first in the grid), the file still has every
    # earlier result, in the table's order
    real_write = bench_samplers.write

    def write_then_die(res, out):
        real_write(res, out)
        raise KeyboardInterrupt

    bench_samplers.write = write_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            bench("--max-steps", "50")
    finally:
        bench_samplers.write = real_write
    kept = json.loads((out / "bench_samplers.json").read_text())["runs"]
    assert settings(kept) == [("ddpm", 50), ("ddim", 10), ("ddim", 20), ("dpm++", 10), ("dpm++", 20)]
    assert kept[1:] == again["runs"]
    # --only measures just the settings named, in the order given, and keeps the rest; --compile says so per row
    only = bench("--only", "dpm++:50", "--compile")
    assert settings(only["runs"]) == settings(kept) + [("dpm++", 50)]
    assert only["runs"][:5] == kept and only["runs"][5]["machine"].endswith(", compiled")
    # a file from before --seed-base (no seed_base key) was measured with the default seeds: still reused
    old = json.loads((out / "bench_samplers.json").read_text())
    del old["seed_base"]
    (out / "bench_samplers.json").write_text(json.dumps(old))
    assert bench("--only", "dpm++:50")["runs"] == only["runs"]
    # other seeds are another measurement: nothing reused, the FID differs
    other = bench("--max-steps", "10", "--seed-base", "7")
    assert settings(other["runs"]) == [("ddim", 10), ("dpm++", 10)] and other["runs"][0]["fid"] != res["runs"][0]["fid"]
    assert "the same seeds (7 + i)" in (out / "bench_samplers.md").read_text()
    with pytest.raises(SystemExit, match="not a setting of the grid.*dpm\\+\\+:250"):
        bench("--only", "dpm++:30")


def test_bench_moe_runs_and_writes_its_table(tmp_path):
    import bench_moe

    rows = bench_moe.main(["--device", "cpu", "--reps", "1", "--dim", "32", "--batch", "4", "--tokens", "16", "--steps",
                           "--out", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["active_params"]["MoE"] > 0
    assert set(rows[0]["ratios"]) == {"TC-MoE / dense", "EC-MoE / dense", "TC-MoE static buffers / dense", "TC-MoE loop dispatch / TC-MoE",
                                      "TC loop / TC-MoE", "EC loop / EC-MoE", "matmuls balanced / dense",
                                      "matmuls padded / dense"}
    table = (tmp_path / "bench_moe.md").read_text()
    assert "| 4 x 16 |" in table and "| TC-MoE |" in table.split("Whole training steps")[1]


def test_bench_moe_refuses_bad_flags_in_one_line(tmp_path, capsys):
    import bench_moe

    (tmp_path / "file").write_text("")
    for flags, words in ((["--tokens", "0"], "--tokens: must be >= 1"), (["--batch", "-2"], "--batch: must be >= 1"),
                         (["--reps", "0"], "--reps: must be >= 1"), (["--reps", "x"], "expected a whole number"),
                         (["--device", "tpu"], "--device must be"),
                         (["--out", str(tmp_path / "file")], "is a file; give a folder")):
        with pytest.raises(SystemExit) as e:
            bench_moe.main(["--dim", "8", "--batch", "2", "--tokens", "4", "--reps", "1", *flags])
        assert e.value.code == 2 and words in capsys.readouterr().err, flags
