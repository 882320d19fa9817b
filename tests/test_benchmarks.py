"""The GPU benchmark runs its whole code path on the CPU at tiny sizes, so it cannot rot before a GPU is at hand."""
import json
import sys
from pathlib import Path

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
