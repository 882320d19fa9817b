import json
from pathlib import Path

from tests.helpers import run_cli


def test_comparison_end_to_end_tiny_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--out", out, "--data", "digits", "--image-size", 8, "--patch", 2, "--max-steps", 2,
            "--eval-every", 1, "--num-samples", 20, "--num-sampling-steps", 2, "--global-batch-size", 8,
            "--seeds", 0, 1, "--no-progress"]
    assert run_cli(*args) == 0
    assert "report.md (6 runs of these variants and seeds)" in capsys.readouterr().out  # (the default variants)
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {f"{v}/seed{s}" for v in ("DiT", "DTR", "Switch-DiT") for s in (0, 1)}
    for rec in res["runs"].values():
        assert set(rec["evals"]) == {"1", "2"} and rec["gflops"] > 0
    # Only the routing differs: DiT and DTR have the same parameter count, Switch-DiT more.
    p = {k.split("/")[0]: v["params_m"] for k, v in res["runs"].items()}
    assert p["DiT"] == p["DTR"] < p["Switch-DiT"]
    report = (out / "report.md").read_text()
    assert "| Switch-DiT |" in report and "±" in report
    assert "Command: `switch-dit compare --out" in report
    assert "## Conclusion, checkpoint by checkpoint" in report and "- step 2: Switch-DiT below DiT: **" in report
    assert "| Switch-DiT | 0 | " in report.split("## Learned routing at the end of training")[1]
    assert "paired seeds" in report and "| Switch-DiT | " in report.split("final-quarter MSE")[1]
    # Every Switch-DiT seed's final routing is recorded and tabulated (only Switch-DiT has timestep gates).
    for k, rec in res["runs"].items():
        assert ("routing" in rec) == k.startswith("Switch-DiT/")
    assert all(res["runs"][f"Switch-DiT/seed{s}"]["routing"]["num_blocks"] == 6 for s in (0, 1))
    table = report.split("## Learned routing at the end of training")[1]
    assert "| Switch-DiT | 0 | " in table and "| Switch-DiT | 1 | " in table and "agreement with the prior" in table
    for f in ("fid_vs_steps.png", "fid_vs_gflops.png", "loss_vs_steps.png", "Switch-DiT_routing_map.png",
              "DiT_grid.png"):
        assert (out / f).is_file()
    # Rerunning reuses the finished runs and evaluations.
    mtime = (out / "runs" / "DiT_seed0" / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert (out / "runs" / "DiT_seed0" / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns == mtime


def test_a_verdict_needs_a_gap_beyond_the_seed_spread_and_every_paired_seed():
    from switch_dit.compare import _verdict

    assert _verdict(3.5, 0.6, 3, 3) == "yes"
    assert _verdict(0.8, 0.9, 1, 3) == "within seed noise"   # lower on average, not in most seeds
    assert _verdict(2.5, 1.0, 2, 3) == "within seed noise"   # a clear mean gap, but one seed disagrees
    assert _verdict(-4.0, 1.0, 0, 3) == "no"
    assert _verdict(1.0, 0.0, 1, 1) == "one seed: no spread to judge by"


def test_flow_comparison_uses_a_flow_sampler_and_says_what_it_measured(tmp_path):
    out = tmp_path / "cmpf"
    args = ["compare", "--objective", "flow", "--out", out, "--data", "digits", "--image-size", 8, "--patch", 2,
            "--max-steps", 2, "--eval-every", 2, "--num-samples", 20, "--num-sampling-steps", 2,
            "--global-batch-size", 8, "--seeds", 0, "--no-progress"]
    assert run_cli(*args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "flow" and res["config"]["sampler"] == "heun"
    report = (out / "report.md").read_text()
    assert report.startswith("# DiT vs DTR vs Switch-DiT on scikit-learn digits: flow matching")
    assert "Training MSE (velocity;" in report and "(heun, 2 steps" in report
    assert "## Learned routing at the end of training" in report
    assert res["runs"]["Switch-DiT/seed0"]["routing"]["num_timesteps"] == 1000
    # A hand-written discussion beside the report survives rewriting it.
    from switch_dit.compare import write_report

    (out / "discussion.md").write_text("Routing follows the prior.\n")
    write_report(res, out)
    assert "## Discussion" in (out / "report.md").read_text() and "Routing follows the prior." in \
        (out / "report.md").read_text()


def test_variant_specs_token_routing_and_reuse(tmp_path, capsys):
    """--variants takes specs (options checked before any training), labels every table with them, records each
    routed variant's map; --reuse takes over a finished run only after retraining its first steps bit-identically."""
    base = ["compare", "--data", "digits", "--image-size", 8, "--patch", 2, "--max-steps", 2, "--eval-every", 2,
            "--num-samples", 20, "--num-sampling-steps", 2, "--global-batch-size", 8, "--seeds", 0, "--no-progress",
            "--objective", "flow"]
    assert run_cli(*base, "--out", tmp_path / "bad", "--variants", "DiT", "Switch-DiT:lamda_dp=0") == 2
    assert "lamda_dp" in capsys.readouterr().err and not (tmp_path / "bad" / "runs").exists()
    # a known option with a value the variant refuses: also before the first variant trains
    assert run_cli(*base, "--out", tmp_path / "bad", "--variants", "DiT", "EC-MoE:moe_capacity_factor=2") == 2
    err = capsys.readouterr().err
    assert "'EC-MoE:moe_capacity_factor=2'" in err and "--moe-top-k" in err and not (tmp_path / "bad" / "runs").exists()
    # what train checks before it starts (a VAE folder, the device), an option given twice, and two specs of one
    # run: all refused before the first variant trains
    for variants, words in ((["DiT", "TC-MoE:vae=/nonexistent"], "no AutoencoderKL folder"),
                            (["DiT", "TC-MoE:device=tpu"], "--device must be"),
                            (["DiT", "EC-MoE:moe_scope=sample,moe_experts=32,moe_top_k=1"], "not a whole number"),
                            (["DiT", "TC-MoE:moe_experts=4,moe_experts=16"], "moe_experts is given twice"),
                            (["DiT", "TC-MoE", "TC-MoE:moe_experts=8"], "TC-MoE and TC-MoE:moe_experts=8 describe the same run")):
        assert run_cli(*base, "--out", tmp_path / "bad", "--variants", *variants) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "bad" / "runs").exists(), variants
    first = tmp_path / "first"
    assert run_cli(*base, "--out", first, "--variants", "DiT", "Switch-DiT:lambda_dp=0", "TC-MoE", "EC-MoE") == 0
    res = json.loads((first / "results.json").read_text())
    assert set(res["runs"]) == {"DiT/seed0", "Switch-DiT:lambda_dp=0/seed0", "TC-MoE/seed0", "EC-MoE/seed0"}
    assert (first / "runs" / "Switch-DiT_lambda_dp=0_seed0" / "config.yaml").read_text().count("lambda_dp: 0.0") == 1
    tc = res["runs"]["TC-MoE/seed0"]
    assert tc["params_m"] > 1.5 * tc["active_params_m"] and abs(tc["active_params_m"] / res["runs"]["DiT/seed0"]
                                                               ["active_params_m"] - 1) < 0.05
    for key in ("TC-MoE/seed0", "EC-MoE/seed0", "Switch-DiT:lambda_dp=0/seed0"):
        assert res["runs"][key]["routing"]["expert_map"]["num_blocks"] == 6
    report = (first / "report.md").read_text()
    assert report.startswith("# DiT vs Switch-DiT:lambda_dp=0 vs TC-MoE vs EC-MoE on scikit-learn digits")
    assert "| Switch-DiT:lambda_dp=0 vs TC-MoE | 2 |" in report and "## Which experts each timestep reaches" in report
    assert "null (bits)" in report and "under --compile it samples dropless through fixed per-expert buffers" in report
    assert "penultimate" not in report and "Time per training step" not in report  # new features; not XS/4
    assert tc["compiled_sampling_gflops"] > 2 * tc["gflops"]
    assert "compiled_sampling_gflops" not in res["runs"]["EC-MoE/seed0"]
    assert "mean_null_information_bits" in res["runs"]["TC-MoE/seed0"]["routing"]["expert_map"]
    assert (first / "routing_side_by_side.png").is_file() and (first / "TC-MoE_routing_map.png").is_file()
    # the same folder for one of its variants: nothing trains; the count printed is the report's, not the file's
    capsys.readouterr()
    assert run_cli(*base, "--out", first, "--variants", "DiT") == 0
    assert "(1 run of these variants and seeds; results.json also keeps 3 of other variants or seeds)" in \
        capsys.readouterr().out
    second = tmp_path / "second"
    assert run_cli(*base, "--out", second, "--variants", "DiT", "TC-MoE:moe_aux_alpha=0.1", "--reuse", first,
                   "--reuse-check-steps", 2) == 0
    res2 = json.loads((second / "results.json").read_text())
    assert res2["runs"]["DiT/seed0"]["reused_from"].endswith("DiT_seed0")
    assert res2["runs"]["DiT/seed0"]["evals"] == res["runs"]["DiT/seed0"]["evals"]
    assert not (second / "runs" / "DiT_seed0" / "checkpoints").exists()  # taken over, not retrained
    assert "reused_from" not in res2["runs"]["TC-MoE:moe_aux_alpha=0.1/seed0"]  # another config: trained
    assert "Runs taken over from an earlier comparison" in (second / "report.md").read_text()


def test_reuse_checks_whole_logging_intervals(tmp_path, capsys):
    """Logged losses are means over --log-every steps (50 here): a check of 1 step is rounded up to what the source
    logged (its final step 4 here) instead of comparing a 1-step mean with nothing and retraining the run."""
    base = ["compare", "--data", "digits", "--image-size", 8, "--patch", 2, "--max-steps", 4, "--eval-every", 4,
            "--num-samples", 20, "--num-sampling-steps", 2, "--global-batch-size", 8, "--seeds", 0, "--no-progress",
            "--objective", "flow", "--variants", "DiT"]
    assert run_cli(*base, "--out", tmp_path / "a") == 0
    assert run_cli(*base, "--out", tmp_path / "b", "--reuse", tmp_path / "a", "--reuse-check-steps", 1) == 0
    rec = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]["DiT/seed0"]
    assert rec["reused_from"].endswith("DiT_seed0") and rec["reuse_check_steps"] == 4


def test_report_of_a_committed_comparison_names_its_features_and_step_times(tmp_path):
    """Evaluations made before precision/recall moved to the convolutional features say so; the flow XS/4 report
    takes time per step from the side-by-side benchmark, not from wall-clock train times."""
    from switch_dit.compare import BENCH_MOE, write_report

    res = json.loads((Path(__file__).resolve().parents[1] / "docs/results/compare-flow/results.json").read_text())
    write_report(res, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Precision and recall here use the classifier's 128-d penultimate features" in report
    bench = json.loads(BENCH_MOE.read_text())["steps"]
    lo, hi = bench["ratio_quartiles"]["Switch-DiT"]
    assert (f"| Switch-DiT | {bench['ms']['Switch-DiT']:.1f} | {bench['ratio_to_dit']['Switch-DiT']:.2f} "
            f"({lo:.2f}-{hi:.2f}) |") in report
    assert "| DTR |" not in report.split("Time per training step")[1]  # not measured there: no row


def test_a_report_mixing_precision_recall_features_marks_them_and_never_averages_them(tmp_path):
    """One report with evaluations from before and after precision/recall moved to the convolutional features: the
    older cells are marked and the header says the kinds are not comparable; a variant whose seeds mix the two shows
    no average of them."""
    import copy

    from switch_dit.compare import write_report

    res = json.loads((Path(__file__).resolve().parents[1] / "docs/results/moe-family/results.json").read_text())
    res = {**res, "config": {**res["config"], "seeds": [0, 1], "variants": ["DiT", "EC-MoE"]},
           "runs": {k: r for k, r in res["runs"].items() if k.split("/")[0] in ("DiT", "EC-MoE")
                    and r["seed"] in (0, 1)}}
    ec = res["runs"]["EC-MoE/seed0"] = copy.deepcopy(res["runs"]["EC-MoE/seed0"])
    for ev in ec["evals"].values():
        ev.update(k=3, precision=0.123, recall=0.456)  # a newer evaluation
    write_report(res, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Precision and recall marked † use the classifier's 128-d penultimate features" in report
    dit = next(x for x in report.splitlines() if x.startswith("| DiT |") and "| 3000 |" in x)
    assert dit.count(" †") == 2
    ec_row = next(x for x in report.splitlines() if x.startswith("| EC-MoE |") and "| 3000 |" in x)
    assert ec_row.count("mixed features") == 2 and "0.123" not in ec_row and "0.456" not in ec_row
    for r in res["runs"].values():  # every evaluation newer: no mark, no sentence
        for ev in r["evals"].values():
            ev["k"] = 3
    write_report(res, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "†" not in report and "penultimate" not in report and "mixed features" not in report


def test_step_times_from_a_malformed_or_foreign_benchmark_file_are_left_out(tmp_path):
    """The report's step-time table reads a JSON file: garbage, a missing section, nulls or another setting give no
    table (never a traceback or another setting's numbers)."""
    from switch_dit.compare import _step_time_lines

    res = {"config": {"size": "XS", "patch": 4, "objective": "flow", "image_size": 16, "global_batch_size": 64}}
    bench = tmp_path / "bench.json"
    good = {"steps": {"ms": {"DiT": 150.0, "TC-MoE": None}, "ratio_to_dit": {"DiT": 1.0, "TC-MoE": None}}}
    for text in ("{not json", "[]", '{"steps": null}', '{"steps": {"ms": [1, 2]}}', json.dumps(good)):
        bench.write_text(text)
        lines = _step_time_lines(res, ["DiT", "TC-MoE"], bench)
        assert lines == [] or ("| DiT | 150.0 | 1.00 |" in lines and not any("TC-MoE" in x for x in lines))
    assert "| DiT | 150.0 | 1.00 |" in _step_time_lines(res, ["DiT"], bench)
    with_spread = {"steps": {"ms": {"DiT": 150.0, "EC-MoE": 180.0}, "ratio_to_dit": {"DiT": 1.0, "EC-MoE": 1.2},
                             "ratio_quartiles": {"DiT": [1.0, 1.0], "EC-MoE": [1.1, "x"]}}}
    bench.write_text(json.dumps(with_spread))
    lines = _step_time_lines(res, ["DiT", "EC-MoE"], bench)
    assert "| DiT | 150.0 | 1.00 (1.00-1.00) |" in lines and "| EC-MoE | 180.0 | 1.20 |" in lines  # malformed: none
    other = {"config": {**res["config"], "image_size": 28}}
    assert _step_time_lines(other, ["DiT"], bench) == []


def test_the_report_says_when_the_warm_up_outlasts_the_run():
    from switch_dit.compare import _warmup_note

    assert _warmup_note({"lr": 1e-3, "warmup_steps": 200, "max_steps": 3000}) == ""
    note = _warmup_note({"lr": 1e-3, "warmup_steps": 200, "max_steps": 2})
    assert "never reached" in note and "lr 1e-05" in note  # train.lr_at(step 1) = 1e-3 * 2 / 200
