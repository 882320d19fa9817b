"""The paper's comparison at small scale: DiT vs DTR vs Switch-DiT (or any variant specs, such as
``Switch-DiT:lambda_dp=0`` or the token-routed ``TC-MoE`` and ``EC-MoE``), same size, seed, data order and budget.

Only the routing differs between the runs. FID / IS / precision / recall use the bundled
Fashion-MNIST classifier's features (not comparable with Inception-based numbers) at several checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import PRESETS, Config, parse_spec_options
from .flops import forward_gflops

VARIANTS = ("DiT", "DTR", "Switch-DiT")  # the paper's comparison: the default
# Options a spec may not set: the comparison itself decides them for every run alike.
_FIXED = ("model", "global_seed", "results_dir", "resume", "max_steps", "ckpt_every", "keep_last", "sample_every",
          "time_budget", "data", "data_path", "image_size", "objective", "sampler", "num_sampling_steps", "cfg_scale")


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """'Switch-DiT:lambda_dp=0,top_k=1' -> (label, variant, {option: value}); options are Config fields (dashes
    or underscores), checked and typed here, so that a typo fails before any training."""
    from .models.dit import VARIANTS as KNOWN

    name, _, opts = spec.partition(":")
    if name not in KNOWN:
        raise ValueError(f"unknown variant {name!r} in {spec!r}: expected one of {', '.join(KNOWN)}, optionally "
                         "followed by :option=value,... (e.g. Switch-DiT:lambda_dp=0)")
    options = parse_spec_options(opts, f"variant {spec!r}", "the names of 'switch-dit train --help', e.g. lambda_dp=0")
    for key in options:
        if key in _FIXED:
            raise ValueError(f"variant {spec!r}: {key} is set by the comparison for every run alike; use the "
                             f"compare flag instead")
    label = name + (":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())
                    if options else "")
    return label, name, options


def _warmup_note(cfg: dict) -> str:
    """Where the linear warm-up outlasts the run, the lr it ends at (the lr printed is never reached)."""
    warm, steps, lr = cfg.get("warmup_steps") or 0, cfg.get("max_steps") or 0, cfg.get("lr")
    if not (isinstance(lr, (int, float)) and warm > steps > 0):
        return ""
    return f" (never reached: its {warm}-step linear warm-up ends the run at lr {lr * steps / warm:.3g})"


def _run_name(label: str) -> str:
    """A folder name for a variant label: 'Switch-DiT:lambda_dp=0' -> 'Switch-DiT_lambda_dp=0'."""
    return label.replace(":", "_").replace(",", "_").replace("/", "-")


def label_of(rec: dict) -> str:
    """The variant label of a run record (records written before variant specs: the model name's variant)."""
    return rec.get("variant") or rec["model"].rsplit("-", 1)[0]


def _evaluate_checkpoint(path: Path, extractor, ref_feats, num_samples: int, cfg_scale: float, batch: int) -> dict:
    from .evaluate.run import score
    from .sample import load_model_for_sampling, sample_images

    model, cfg, step = load_model_for_sampling(str(path))
    cfg.cfg_scale = cfg_scale
    # The same noise and labels for every model and training seed.
    images = sample_images(model, cfg, num_samples, "cpu", batch_size=batch, seed_base=1_000_003 * 12345)
    result = score(images, extractor, ref_feats)
    result["step"] = step
    return result


def run_comparison(out_dir: str, size: str = "XS", patch: int = 4, seeds=(0,), max_steps: int | None = None,
                   eval_every: int | None = None, num_samples: int = 1000, cfg_scale: float = 1.5,
                   overrides: dict | None = None, progress: bool = True, command: str | None = None,
                   variants=VARIANTS, reuse: str | None = None, reuse_check_steps: int = 100) -> dict:
    """Train each variant for each seed (resumable: finished runs are reused), evaluate, write a report.

    variants: specs 'NAME[:option=value,...]' (parse_variant). reuse: another comparison's folder whose finished
    runs with exactly this run's config and evaluation settings are taken over instead of retrained, once their
    first ``reuse_check_steps`` steps retrain to bit-identical logged losses here."""
    from .evaluate.features import ClassifierExtractor
    from .evaluate.run import reference_features

    specs = [parse_variant(v) for v in variants]
    labels = [label for label, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variants names a variant twice: {' '.join(labels)}")
    if len({s % 2**32 for s in seeds}) != len(seeds):  # (sample seeds are taken modulo 2^32: -1 is 2^32 - 1)
        raise ValueError(f"--seeds names a seed twice ({' '.join(map(str, seeds))}): each seed is one run")
    if reuse is not None and not (Path(reuse) / "results.json").is_file():
        raise ValueError(f"--reuse {reuse}: no results.json there; give the folder of an earlier comparison")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the report")
    base = dict(PRESETS["cpu-fashion"], time_budget=0.0)  # the same step count for every run, on any machine
    if (overrides or {}).get("objective") == "flow":
        # the DDPM comparison's DDIM-50 becomes Heun with 25 steps: 49 model calls, the same budget
        base.update(sampler="heun", num_sampling_steps=25)
    base.update(overrides or {})
    if max_steps is not None:
        base["max_steps"] = max_steps
    eval_every = eval_every or max(1, base["max_steps"] // 3)

    def run_config(label, variant, options, seed):
        run_dir = out / "runs" / f"{_run_name(label)}_seed{seed}"
        return run_dir, Config(**{**base, **options, "model": f"{variant}-{size}/{patch}", "global_seed": seed,
                                  "results_dir": str(run_dir), "ckpt_every": eval_every, "keep_last": 1000,
                                  "sample_every": 0, "resume": "auto"})

    from .train import preflight

    for seed in seeds:  # every variant's options and every seed checked before the first run trains
        for label, variant, options in specs:
            try:
                preflight(run_config(label, variant, options, seed)[1])
            except ValueError as e:
                raise ValueError(f"variant {label!r}, seed {seed}: {e}") from None
    same = {}  # two specs of one run (e.g. TC-MoE and TC-MoE:moe_experts=8, the default) would train it twice
    for label, variant, options in specs:
        run = dataclasses.asdict(run_config(label, variant, options, seeds[0])[1])
        run.pop("results_dir")
        key = json.dumps(run, sort_keys=True, default=str)
        if key in same:
            raise ValueError(f"--variants {same[key]} and {label} describe the same run (an option set to its "
                             "default); give it once")
        same[key] = label
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused comparison leaves nothing behind
    extractor = ClassifierExtractor()
    ref_feats, _, _ = reference_features(extractor, base.get("data", "fashion-mnist"), base.get("data_path"), "train",
                                         base["image_size"], 10_000)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["config"] = {**base, "size": size, "patch": patch, "seeds": list(seeds), "num_samples": num_samples,
                         "cfg_scale": cfg_scale, "eval_every": eval_every}
    results["config"]["reference"] = {"data": base.get("data", "fashion-mnist"), "split": "train",
                                      "num": int(len(ref_feats))}
    if list(labels) != list(VARIANTS):
        results["config"]["variants"] = labels
    if command:
        results["command"] = command
    for seed in seeds:
        for label, variant, options in specs:
            name = f"{variant}-{size}/{patch}"
            key = f"{label}/seed{seed}"
            run_dir, cfg = run_config(label, variant, options, seed)  # validated above
            rec = results["runs"].get(key)
            if rec is None and reuse is not None:
                rec = _reuse_run(Path(reuse), key, label, seed, cfg, results["config"], run_dir, reuse_check_steps)
                if rec is not None:
                    results["runs"][key] = rec
                    _copy_pictures(Path(reuse), label, out, seed == seeds[0])
            rec = results["runs"].setdefault(key, {"model": name, "seed": seed, "evals": {}})
            rec.update(variant=label, options=options)
            _train_and_evaluate(rec, cfg, run_dir, eval_every, extractor, ref_feats, num_samples, cfg_scale,
                                results, results_path, progress)
            results_path.write_text(json.dumps(results, indent=1))
            if seed == seeds[0] and not (out / f"{_run_name(label)}_grid.png").exists() and \
                    list((run_dir / "checkpoints").glob("step_*.pt")):
                _pictures(run_dir, _run_name(label), out, cfg)
        write_report(results, out)  # after every seed: a long comparison has a report all along
    results_path.write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results


def _train_and_evaluate(rec: dict, cfg: Config, run_dir: Path, eval_every: int, extractor, ref_feats,
                        num_samples: int, cfg_scale: float, results: dict, results_path: Path, progress: bool) -> None:
    from .factory import model_options
    from .train import train

    if rec.get("finished_step") != cfg.max_steps:
        t0 = time.time()
        summary = train(cfg, progress=progress)
        rec["train_seconds"] = rec.get("train_seconds", 0.0) + time.time() - t0
        rec["params_m"] = sum(p.numel() for p in summary["model"].parameters()) / 1e6
        rec["finished_step"] = summary["step"]
    opts = model_options(cfg)
    rec["gflops"] = forward_gflops(cfg.model, cfg.image_size, 1, 10, **opts)
    rec.pop("sampling_gflops", None)  # its name before eager dispatch computed the active FLOPs
    compiled = forward_gflops(cfg.model, cfg.image_size, 1, 10, compiled_sampling=True, **opts)
    if compiled != rec["gflops"]:  # token choice under torch.compile: fixed buffers (see flops)
        rec["compiled_sampling_gflops"] = compiled
    rec["active_params_m"] = active_parameters(cfg) / 1e6
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = str(int(ckpt.stem.split("_")[1]))
        if int(step) % eval_every and int(step) != cfg.max_steps:
            continue  # a checkpoint off the evaluation grid (e.g. of an earlier, finer setting)
        if step not in rec["evals"]:
            rec["evals"][step] = _evaluate_checkpoint(ckpt, extractor, ref_feats, num_samples, cfg_scale, 100)
            results_path.write_text(json.dumps(results, indent=1))
    final = run_dir / "checkpoints" / f"step_{cfg.max_steps:07d}.pt"
    routing = rec.get("routing")
    if final.is_file() and (routing is None or "expert_map" not in routing):
        routing = _routing(final, cfg)  # every seed's map, so the report can say what is stable
        if routing is not None:
            rec["routing"] = routing
    elif routing and "expert_map" not in routing and "prior_agreement" in routing:
        # a run taken over without its checkpoints: its map rebuilt from the recorded summary where that is exact
        from .analysis import binned_pattern, pattern_from_summary, token_routing_record
        pattern = pattern_from_summary(routing, cfg.top_k)
        if pattern is not None:
            routing["expert_map"] = {**token_routing_record(binned_pattern(pattern, routing["num_experts"]),
                                                            "timestep"), "rebuilt_from_summary": True}


def active_parameters(cfg: Config) -> int:
    """flops.active_parameters of cfg's model (built on the 'meta' device: no memory)."""
    from .factory import model_options
    from .flops import active_parameters as count
    from .models import create_model

    with torch.device("meta"):
        model = create_model(cfg.model, input_size=cfg.image_size, in_channels=1, num_classes=10,
                             learn_sigma=cfg.learn_sigma and cfg.objective == "ddpm", **model_options(cfg))
    return count(model)


def _reuse_run(src: Path, key: str, label: str, seed: int, cfg: Config, compare_cfg: dict, run_dir: Path,
               check_steps: int) -> dict | None:
    """Take over a finished run of another comparison when it is this run: the same training config (all but its
    folder), the same evaluation settings, and its first ``check_steps`` steps retrain here to bit-identical
    logged losses. Prints why not, otherwise."""
    import dataclasses
    import shutil
    import tempfile

    import yaml

    from .integrations import read_metrics
    from .train import train

    theirs = json.loads((src / "results.json").read_text())
    rec = theirs["runs"].get(key)
    src_run = src / "runs" / f"{_run_name(label)}_seed{seed}"
    if rec is None or rec.get("finished_step") != cfg.max_steps or not (src_run / "config.yaml").is_file():
        return None
    say = lambda why: print(f"[switch-dit] not reusing {src_run}: {why}", flush=True)  # noqa: E731
    evaluation = ("num_samples", "cfg_scale", "eval_every", "sampler", "num_sampling_steps", "size", "patch")
    diff = [k for k in evaluation if theirs["config"].get(k) != compare_cfg.get(k)]
    if diff:
        return say(f"evaluated with other settings ({', '.join(diff)})")
    saved = yaml.safe_load((src_run / "config.yaml").read_text())
    defaults, ours = dataclasses.asdict(Config()), dataclasses.asdict(cfg)
    diff = [k for k in ours if k not in ("results_dir", "resume") and saved.get(k, defaults[k]) != ours[k]]
    if diff:
        return say(f"trained with other options ({', '.join(diff)})")
    # the logged losses are means over log_every steps: compare whole intervals, as the source run logged them
    check_steps = min(-(-max(1, check_steps) // cfg.log_every) * cfg.log_every, cfg.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        probe = dataclasses.replace(cfg, results_dir=tmp, max_steps=check_steps, resume=None, tensorboard=False)
        train(probe, progress=False)
        mine = {m["step"]: m for m in read_metrics(str(Path(tmp) / "metrics.jsonl"))}
    old = {m["step"]: m for m in read_metrics(str(src_run / "metrics.jsonl")) if m["step"] in mine}
    keys = ("train/loss", "train/mse")
    if not mine:
        return say("no retrained step to check it against")
    missing = sorted(set(mine) - set(old))
    if missing:
        return say(f"its log has no loss at step {missing[0]} to check the retrained steps against")
    if any(old[s].get(k) != mine[s][k] for s in mine for k in keys):
        return say(f"its first {check_steps} steps do not retrain bit-identically here")
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "config.yaml"):
        shutil.copy(src_run / f, run_dir / f)
    print(f"[switch-dit] reusing {src_run}: same config and evaluation, first {check_steps} steps bit-identical",
          flush=True)
    return {**rec, "reused_from": str(src_run), "reuse_check_steps": check_steps}


def _copy_pictures(src: Path, label: str, out: Path, first_seed: bool) -> None:
    import shutil

    if not first_seed:
        return
    name = _run_name(label)
    for what in ("grid", "routing_map", "routing_affinity"):
        if (src / f"{name}_{what}.png").is_file():
            shutil.copy(src / f"{name}_{what}.png", out / f"{name}_{what}.png")
    if (src / f"{_run_name(label)}_analysis").is_dir():
        shutil.copytree(src / f"{_run_name(label)}_analysis", out / f"{_run_name(label)}_analysis", dirs_exist_ok=True)


def _pictures(run_dir: Path, variant: str, out: Path, cfg: Config) -> None:
    """A class grid of the final EMA model, and for Switch-DiT its routing maps."""
    from .analysis import analyze
    from .sample import class_grid, load_model_for_sampling, write_grid

    final = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    model, run_cfg, _ = load_model_for_sampling(str(final))
    with torch.no_grad():
        grid = class_grid(model, run_cfg, model.num_classes, per_class=10, seed=0)
    write_grid(str(out / f"{variant}_grid.png"), grid, scale=max(1, 48 // run_cfg.image_size))
    import shutil
    if model.prior is not None:
        summary = analyze(model, out / f"{variant}_analysis")
        shutil.copy(summary["files"]["task_expert_map"], out / f"{variant}_routing_map.png")
        shutil.copy(summary["files"]["task_affinity"], out / f"{variant}_routing_affinity.png")
    elif model.mixtures:
        from .analysis import analysis_images, analyze_tokens
        summary = analyze_tokens(model, run_cfg, *analysis_images(run_cfg), out / f"{variant}_analysis")
        shutil.copy(summary["files"]["token_expert_map"], out / f"{variant}_routing_map.png")


def _routing(ckpt: Path, cfg: Config) -> dict | None:
    """The final EMA model's routing summary: Switch-DiT's (shared/unused experts, switch timesteps, agreement
    with the prior) and, for every routed variant, its (block, timestep bin, expert) map with the timestep
    information per block (``expert_map``); None for DiT and DTR (nothing learned routes)."""
    from .analysis import analysis_images, binned_switch_map, routing_record, token_routing, token_routing_record
    from .sample import load_model_for_sampling

    model, run_cfg, _ = load_model_for_sampling(str(ckpt))
    if model.prior is not None:
        rec = routing_record(model)
        rec["expert_map"] = token_routing_record(binned_switch_map(model), "timestep")
        return rec
    if model.mixtures:
        return {"expert_map": token_routing(model, run_cfg, *analysis_images(run_cfg))[1]}
    return None


def routing_lines(results: dict) -> list[str]:
    """A table of every Switch-DiT seed's learned routing at the end of training."""
    recs = sorted((r for r in results["runs"].values() if "prior_agreement" in r.get("routing", {})),
                  key=lambda r: (label_of(r), r["seed"]))
    if not recs:
        return []
    r0 = recs[0]["routing"]
    lines = ["", "## Learned routing at the end of training", "",
             f"Switch-DiT's gates read only the timestep, so each seed's routing is a fixed map from the "
             f"{r0['num_timesteps']} timesteps (bins of t for flow) to the top-k of {r0['num_experts']} experts in each "
             f"of {r0['num_blocks']} blocks (final EMA model). Per seed: blocks in which one expert serves every "
             "timestep (a shared expert), experts never chosen, switch points (timesteps where a block's choice "
             "changes; t = 0 is the least noise), and the fraction of (timestep, slot) entries equal to the "
             "diffusion prior matched to the learned slots.", "",
             "| variant | seed | blocks with a shared expert | unused experts | switch points per block | where "
             "(block: t) | agreement with the prior |", "|---|---|---|---|---|---|---|"]
    for rec in recs:
        r = rec["routing"]
        per_block = [len(b["switch_timesteps"]) for b in r["blocks"]]
        where = "; ".join(f"{b['block'] + 1}: {', '.join(map(str, b['switch_timesteps'][:6]))}"
                          + (" ..." if len(b["switch_timesteps"]) > 6 else "")
                          for b in r["blocks"] if b["switch_timesteps"])
        unused = sum(len(b["unused_experts"]) for b in r["blocks"])
        agree = f"{100 * r['prior_agreement']:.2f}%" if "prior_agreement" in r else "n/a"  # 99.96% is not 100%
        lines.append(f"| {label_of(rec)} | {rec['seed']} | {r['blocks_with_a_shared_expert']}/{r['num_blocks']} | {unused} | "
                     f"{', '.join(map(str, per_block))} | {where or 'none'} | {agree} |")
    return lines


def _sd(x) -> float:
    """The sample standard deviation (ddof = 1) of seed results; 0 for a single seed."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _pm(values, digits: int) -> str:
    """' ± sample std' over several seeds; nothing for one (its spread is unknown, not 0)."""
    return f" ± {_sd(values):.{digits}f}" if len(values) > 1 else ""


def _aggregate(results: dict) -> dict:
    """variant -> step -> metric -> (mean, sample std over seeds). Precision and recall of evaluations from two
    feature kinds (_pr_features) are not averaged together: NaN."""
    agg: dict = {}
    kinds = _pr_kinds(results)
    for rec in results["runs"].values():
        variant = label_of(rec)
        for step, ev in rec["evals"].items():
            for m in ("fid", "is_mean", "precision", "recall"):
                mixed = m in ("precision", "recall") and len(kinds[variant, int(step)]) > 1
                agg.setdefault(variant, {}).setdefault(int(step), {}).setdefault(m, []).append(
                    float("nan") if mixed else ev[m])
    return {v: {s: {m: (float(np.mean(x)), _sd(x), len(x)) for m, x in ms.items()} for s, ms in sorted(steps.items())}
            for v, steps in agg.items()}


def _pr_features(ev: dict) -> str:
    """Which classifier features an evaluation's precision/recall used: evaluations from before the switch to the
    2048-d convolutional features (which also record their k-NN 'k') used the 128-d penultimate ones."""
    return "conv" if "k" in ev else "penultimate"


def _pr_kinds(results: dict) -> dict:
    """(variant, step) -> the set of precision/recall feature kinds among its seeds' evaluations."""
    kinds: dict = {}
    for rec in results["runs"].values():
        for step, ev in rec["evals"].items():
            kinds.setdefault((label_of(rec), int(step)), set()).add(_pr_features(ev))
    return kinds


def _loss_curves(results: dict, out: Path, key: str = "train/mse") -> dict:
    """variant -> (steps, per-seed matrix of interval-mean training MSE) from each run's metrics.jsonl."""
    from .integrations import read_metrics

    curves: dict = {}
    for rec in results["runs"].values():
        variant = label_of(rec)
        path = out / "runs" / f"{_run_name(variant)}_seed{rec['seed']}" / "metrics.jsonl"
        if not path.is_file():
            continue
        pts = {m["step"]: m[key] for m in read_metrics(str(path)) if key in m}
        curves.setdefault(variant, {})[rec["seed"]] = pts
    result = {}
    for variant, per_seed in curves.items():
        steps = sorted(set.intersection(*(set(p) for p in per_seed.values())))
        if steps:
            result[variant] = (np.array(steps), np.array([[per_seed[s][t] for t in steps] for s in sorted(per_seed)]))
    return result


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of log values (a steeply falling curve keeps its shape; the ends average what
    exists)."""
    kernel = np.ones(max(1, min(window, len(y))))  # np.convolve's 'same' keeps len(y) only if the kernel is shorter
    logs = np.log(np.maximum(y, 1e-12))
    total = np.convolve(logs, kernel, mode="same")
    count = np.convolve(np.ones_like(logs), kernel, mode="same")
    return np.exp(total / count)


def _paired(results: dict, a: str, b: str, step: int) -> tuple[list[float], list[float]]:
    """FIDs of variants a and b at a step, for the seeds both have (the runs share seed and data order)."""
    fa, fb = {}, {}
    for rec in results["runs"].values():
        v = label_of(rec)
        ev = rec["evals"].get(str(step))
        if ev is not None and v in (a, b):
            (fa if v == a else fb)[rec["seed"]] = ev["fid"]
    seeds = sorted(set(fa) & set(fb))
    return [fa[s] for s in seeds], [fb[s] for s in seeds]


def _verdict(gap: float, pooled: float, wins: int, n: int) -> str:
    """'yes' or 'no' only when the mean gap exceeds twice the seed spread and every paired seed agrees (with a
    single seed: when it agrees); anything less is within the seed noise, whichever way the means lean."""
    if n < 2:
        return "one seed: no spread to judge by"
    clear = abs(gap) > 2 * pooled and (wins == n if gap > 0 else wins == 0)
    if not clear:
        return "within seed noise"
    return "yes" if gap > 0 else "no"


def paired_comparison(a_fid: list[float], b_fid: list[float]) -> dict:
    """Is a's FID lower than b's? The mean gap (b - a), the pooled sample std of the two variants across seeds,
    the gap in those stds, the paired differences' mean and sample std, a paired t-test's two-sided p (scipy;
    None for fewer than 2 seeds), how many paired seeds have a lower, and the verdict (``_verdict``)."""
    a, b = np.asarray(a_fid, float), np.asarray(b_fid, float)
    gap = float(b.mean() - a.mean())
    pooled = float(np.sqrt((_sd(a) ** 2 + _sd(b) ** 2) / 2))
    diff = b - a
    p = None
    if len(a) > 1 and _sd(diff) > 0:
        from scipy.stats import ttest_rel
        p = float(ttest_rel(b, a).pvalue)
    wins = int((a < b).sum())
    return {"gap": gap, "pooled_sd": pooled, "gap_in_sd": abs(gap) / pooled if pooled > 0 else None,
            "diff_mean": float(diff.mean()), "diff_sd": _sd(diff), "p": p, "wins": wins, "n": len(a),
            "verdict": _verdict(gap, pooled, wins, len(a))}


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def conclusions(results: dict, agg: dict) -> list[str]:
    """One line per checkpoint: is Switch-DiT's FID lower than DiT's and DTR's, by how many seed standard
    deviations (the gap over the pooled sample std of the two variants across seeds), in how many paired seeds;
    and whether the paper's full ordering Switch-DiT < DTR < DiT holds (a gap within the seed noise is a tie)."""
    if not {"DiT", "DTR", "Switch-DiT"} <= set(agg):
        return []
    lines = []
    for step in sorted(set(agg["Switch-DiT"]) & set(agg["DiT"]) & set(agg["DTR"])):
        parts = []
        for other in ("DiT", "DTR"):
            c = paired_comparison(*_paired(results, "Switch-DiT", other, step))
            sds = f"{c['gap_in_sd']:.1f} seed std" if c["gap_in_sd"] is not None else "no seed spread"
            p = f", paired t-test p = {_p(c['p'])}" if c["p"] is not None else ""
            parts.append(f"below {other}: **{c['verdict']}** ({'lower' if c['gap'] > 0 else 'higher'} by "
                         f"{abs(c['gap']):.2f} FID = {sds}{p}; lower in {c['wins']}/{c['n']} paired seeds)")
        order = paired_comparison(*_paired(results, "DTR", "DiT", step))
        s_dtr = paired_comparison(*_paired(results, "Switch-DiT", "DTR", step))
        if s_dtr["verdict"] == "yes" and order["verdict"] == "yes":
            sentence = "the paper's order Switch-DiT < DTR < DiT holds"
        elif order["verdict"] == "no":
            sentence = "the paper's order Switch-DiT < DTR < DiT does **not** hold (DTR is worse than DiT)"
        else:
            sentence = "the paper's order Switch-DiT < DTR < DiT is not established (a gap within seed noise)"
        lines.append(f"- step {step}: Switch-DiT {parts[0]}; {parts[1]}; {sentence}.")
    return lines


def _reference(labels: list[str]) -> str:
    """The variant a report compares the others with: Switch-DiT, else the first Switch-DiT spec, else the first."""
    if "Switch-DiT" in labels:
        return "Switch-DiT"
    return next((v for v in labels if v.startswith("Switch-DiT")), labels[0])


def comparison_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """The pairs a report tests: Switch-DiT against every other variant, and every other routed variant against
    the dense DiT."""
    ref = _reference(labels)
    pairs = [(ref, v) for v in labels if v != ref]
    if "DiT" in labels:
        pairs += [(v, "DiT") for v in labels if v not in (ref, "DiT")]
    return pairs


def pair_lines(results: dict, agg: dict, labels: list[str]) -> list[str]:
    """A table of paired FID differences for comparison_pairs at every checkpoint."""
    rows = []
    for a, b in comparison_pairs(labels):
        if a not in agg or b not in agg:
            continue
        for step in sorted(set(agg[a]) & set(agg[b])):
            c = paired_comparison(*_paired(results, a, b, step))
            sds = f"{c['gap_in_sd']:.1f}" if c["gap_in_sd"] is not None else "-"
            p = _p(c["p"]) if c["p"] is not None else "-"
            spread = f" ± {c['diff_sd']:.2f}" if c["n"] > 1 else ""
            rows.append(f"| {a} vs {b} | {step} | {c['diff_mean']:+.2f}{spread} | {sds} | {p} | "
                        f"{c['wins']}/{c['n']} | **{c['verdict']}** |")
    if not rows:
        return []
    return ["", "## Paired FID differences", "",
            "Is the first variant's FID lower? Per checkpoint: the paired difference (second minus first, same seed, "
            "data order and noise) as mean ± sample std over seeds; the mean gap over the pooled sample std of the "
            "two variants; a paired t-test's two-sided p (3 seeds give it little power); the seeds in which the "
            "first is lower. The verdict is **yes** or **no** only when the gap exceeds 2 seed std and every paired "
            "seed agrees, otherwise **within seed noise**.", "",
            "| pair | step | FID difference | gap / seed std | paired t-test p | first lower in | verdict |",
            "|---|---|---|---|---|---|---|", *rows]


def token_routing_lines(results: dict, labels: list[str], out: Path) -> list[str]:
    """Per routed variant: how much the experts a token (or a timestep) reaches depend on the timestep (mutual
    information per block), and the load balance; a side-by-side figure of seed 0's maps."""
    recs = {}
    for rec in results["runs"].values():
        em = rec.get("routing", {}).get("expert_map")
        if em is not None:
            recs.setdefault(label_of(rec), {})[rec["seed"]] = em
    if not recs:
        return []
    lines = ["", "## Which experts each timestep reaches", "",
             "For every routed variant, the final EMA model's (timestep bin x expert) map per block: the fraction of a "
             "bin's tokens each expert processes, measured on 16 training images noised to each of 50 bins, one "
             "sample per bin in every batch (mixed timesteps, as in training; token choice dropless). Switch-DiT's "
             "map is its gates' choice at each timestep. I(t; expert) is the mutual information between the "
             "timestep bin and the expert a routed token slot reaches (bits; 0 = every timestep uses the experts "
             "alike). A map measured on samples overstates it: the null is the same measurement with the samples' "
             "timestep bins shuffled among them (each image's tokens kept together), what a router that ignores the "
             "timestep would score; Switch-DiT's map is exact (null 0). Routed experts per token: the range over "
             "timestep bins of the mean number of routed experts a token gets (expert choice can give some "
             "timesteps more compute; constant k for the others). Load = the busiest expert's share of the routed "
             "slots over the mean share (1 = balanced). Mean ± sample std over seeds where there are several.", "",
             "| variant | routing | seeds | I(t; expert), mean over blocks (bits) | null (bits) | max possible "
             "| per block (seed mean) | routed experts per token over t | busiest expert's load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in [v for v in labels if v in recs]:
        per_seed = recs[label]
        means = [em["mean_timestep_information_bits"] for em in per_seed.values()]
        first = next(iter(per_seed.values()))
        blocks = np.mean([[b["timestep_information_bits"] for b in em["blocks"]] for em in per_seed.values()], 0)
        load = np.mean([max(b["max_over_mean_load"] for b in em["blocks"]) for em in per_seed.values()])
        nulls = [em["mean_null_information_bits"] for em in per_seed.values() if "mean_null_information_bits" in em]
        null = f"{np.mean(nulls):.3f}" if nulls else ("0 (exact)" if first["kind"] == "timestep" else "-")
        per_tok = [v for em in per_seed.values() for b in em["blocks"] for v in b.get("routed_experts_per_token", [])]
        per_tok = f"{min(per_tok):.2f} - {max(per_tok):.2f}" if per_tok else "-"
        spread = _pm(means, 3)
        lines.append(f"| {label} | {first['kind']} | {len(per_seed)} | {np.mean(means):.3f}{spread} | {null} | "
                     f"{first['max_information_bits']:.2f} | {', '.join(f'{v:.2f}' for v in blocks)} | {per_tok} | "
                     f"{load:.2f} |")
    fig = routing_side_by_side({v: recs[v][min(recs[v])] for v in labels if v in recs})
    fig.savefig(out / "routing_side_by_side.png", dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    lines += ["", "![routing maps side by side](routing_side_by_side.png)"]
    return lines


def routing_side_by_side(maps: dict):
    """One row per routed variant (its lowest seed), one column per block: (timestep bin x expert) fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(maps)
    cols = max(em["num_blocks"] for em in maps.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 1.6, 2.3 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for r, (label, em) in enumerate(maps.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c >= em["num_blocks"]:
                ax.axis("off")
                continue
            b = em["blocks"][c]
            m = np.asarray(b["map"])
            ax.imshow(m / max(m.max(), 1e-12), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                      extent=(-0.5, m.shape[1] - 0.5, 1.0, 0.0))
            ax.set_xticks([])
            ax.set_yticks([0, 1] if c == 0 else [])
            ax.set_title(f"block {c + 1}: {b['timestep_information_bits']:.2f} bit", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{label}\nt (0 = data)", fontsize=7)
    fig.suptitle("fraction of each timestep bin's tokens per expert (rows: variants; columns: blocks; x: experts; "
                 "each panel scaled to its maximum)", fontsize=8)
    return fig


_DATA_NAMES = {"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn digits", "folder": "an image folder",
               "latents": "VAE latents"}


BENCH_MOE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench_moe.json"


def _step_time_lines(results: dict, labels: list[str], bench: Path = BENCH_MOE) -> list[str]:
    """Time per training step of the variants as bench_moe.py measured them side by side (its committed JSON),
    where its setting is this comparison's (XS/4, flow matching); wall-clock train times cannot compare speed."""
    cfg = results["config"]
    if not bench.is_file() or (cfg.get("size"), cfg.get("patch"), cfg.get("objective"), cfg.get("image_size"),
                               cfg.get("global_batch_size")) != ("XS", 4, "flow", 16, 64):
        return []
    try:
        steps = json.loads(bench.read_text())["steps"]
        ms, ratio = dict(steps["ms"]), dict(steps["ratio_to_dit"])
    except (ValueError, KeyError, TypeError):
        return []
    quartiles = steps.get("ratio_quartiles") if isinstance(steps.get("ratio_quartiles"), dict) else {}

    def spread(v):  # the ratio's quartiles over repetitions, where the benchmark recorded them
        q = quartiles.get(v)
        ok = isinstance(q, list) and len(q) == 2 and all(isinstance(x, (int, float)) for x in q)
        return f" ({q[0]:.2f}-{q[1]:.2f})" if ok else ""

    rows = [f"| {v} | {ms[v]:.1f} | {ratio[v]:.2f}{spread(v)} |" for v in labels
            if isinstance(ms.get(v), (int, float)) and isinstance(ratio.get(v), (int, float))]
    if not rows:
        return []
    return ["", f"Time per training step, measured side by side in one run by `benchmarks/bench_moe.py --steps` "
                f"({steps.get('setting', 'XS/4, flow matching')}; benchmarks/results/bench_moe.json); variants with "
                "options are not in it:", "", "| variant | ms / step | / DiT (quartiles over repetitions) |",
            "|---|---|---|", *rows]


def _sampling_cost(runs: dict) -> str:
    """A sentence for the variants whose compiled sampling computes more than their active FLOPs (token choice's
    dropless fixed buffers under torch.compile), with both numbers."""
    seen, parts = set(), []
    for r in runs.values():
        compiled = r.get("compiled_sampling_gflops", r.get("sampling_gflops"))  # (its older name)
        if compiled is None or label_of(r) in seen:
            continue
        seen.add(label_of(r))
        if r.get("model", "").startswith("DiffMoE"):
            parts.append(f"{label_of(r)} samples with the experts its capacity predictor asks for (its GFLOPs count "
                         f"the training capacity, {r['gflops']:.4f}); under --compile every expert computes every "
                         f"token, {compiled:.4f} GFLOPs a forward")
            continue
        cf = (r.get("options") or {}).get("moe_capacity_factor", Config.moe_capacity_factor)
        training = ("training is dropless too" if not cf else
                    f"in training the capacity factor {cf:g} bounds them at that multiple of the routed compute")
        parts.append(f"{label_of(r)} computes its active {r['gflops']:.4f} GFLOPs eagerly (each expert on its "
                     f"tokens; small groups padded to the busiest one, by at most a quarter of the routed part), but "
                     f"under --compile it samples dropless through fixed per-expert buffers that hold every token, "
                     f"{compiled:.4f} GFLOPs a forward ({training})")
    return (" " + "; ".join(parts) + ".") if parts else ""


def _pr_note(kinds: set) -> str:
    """The report header's sentence on which features precision and recall used (kinds: those in the report), when
    not all the current ones."""
    old = ("the classifier's 128-d penultimate features (these evaluations predate the switch to its 2048-d "
           "convolutional features, which keep noise out of the data manifold)")
    if kinds == {"penultimate"}:
        return f" Precision and recall here use {old}; FID and IS are unaffected."
    if kinds == {"penultimate", "conv"}:
        return (f" Precision and recall marked † use {old}; the unmarked ones use the convolutional features. The two "
                "kinds are not comparable with each other (compare precision and recall only within one kind); FID "
                "and IS are unaffected.")
    return ""


def write_report(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results.get("config", {})
    labels = list(cfg.get("variants", VARIANTS))
    target = "velocity" if cfg.get("objective") == "flow" else "eps term"  # what the logged MSE is of
    asked = cfg.get("seeds", [0])
    # Only seeds whose runs are all finished and evaluated enter the report (a long comparison reports as it goes).
    finished = {(label_of(rec), rec["seed"]) for rec in results["runs"].values()
                if rec.get("finished_step") == cfg.get("max_steps") and rec.get("evals")}
    seeds = [s for s in asked if all((v, s) in finished for v in labels)]
    partial = not seeds  # no seed done for every variant yet: report the runs there are, and say so
    if partial:
        seeds = sorted({s for _, s in finished}) or list(asked)
    results = {**results, "runs": {k: r for k, r in results["runs"].items()
                                   if r["seed"] in seeds and label_of(r) in labels}}
    agg = _aggregate(results)
    agg = {v: agg[v] for v in labels if v in agg}
    pr_kinds = _pr_kinds(results)
    all_kinds = set().union(*pr_kinds.values())
    runs = results["runs"]
    info = {}
    for rec in runs.values():
        v = label_of(rec)
        i = info.setdefault(v, {"params": rec.get("params_m"), "active": rec.get("active_params_m", rec.get("params_m")),
                                "gflops": rec.get("gflops"), "time": []})
        i["time"].append(rec.get("train_seconds", float("nan")))
    band = len(seeds) > 1 and not partial
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for v, steps in agg.items():
        xs = list(steps)
        ys = np.array([steps[s]["fid"][0] for s in xs])
        sd = np.array([steps[s]["fid"][1] for s in xs])
        ax.plot(xs, ys, marker="o", label=v)
        if band:
            ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
    ax.set_xlabel("training steps")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title("FID vs steps" + (f": mean over {len(seeds)} seeds, band ± 1 sample std" if band else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_steps.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for v, steps in agg.items():
        last = max(steps)
        ax.errorbar([info[v]["gflops"]], [steps[last]["fid"][0]], yerr=[steps[last]["fid"][1]] if band else None,
                    fmt="o", capsize=4, label=v)
    ax.set_xlabel("GFLOPs per forward (one sample, MACs, active experts)")
    ax.set_ylabel("final FID (classifier features)")
    ax.set_title("final FID vs GFLOPs" + (f": mean ± 1 sample std over {len(seeds)} seeds" if band else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_gflops.png", dpi=120)
    plt.close(fig)

    curves = {v: c for v, c in _loss_curves(results, out).items() if v in labels}
    loss_lines = []
    ref = _reference(labels)
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for v, (steps, ys) in curves.items():
            mean = _smooth(ys.mean(0), 5)
            late = steps >= steps[-1] / 3
            for ax, sel in ((axes[0], slice(None)), (axes[1], late)):
                ax.plot(steps[sel], mean[sel], label=v)
                if len(ys) > 1:
                    sd = ys.std(0, ddof=1)
                    ax.fill_between(steps[sel], (mean - sd)[sel], (mean + sd)[sel], alpha=0.15)
        axes[0].set_yscale("log")
        axes[0].set_title("training MSE, mean over seeds" + (" (band ± 1 sample std)" if band else ""), fontsize=9)
        axes[1].set_title("the last two thirds, linear scale", fontsize=9)
        for ax in axes:
            ax.set_xlabel("training steps")
            ax.set_ylabel(f"training MSE ({target.split()[0]}), smoothed")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss_vs_steps.png", dpi=120)
        plt.close(fig)
        # Mean MSE over the last quarter of training, per seed; paired differences against the reference variant.
        first = next(iter(curves.values()))[0]
        every = int(np.diff(first[:2])[0]) if len(first) > 1 else 1
        loss_lines = ["", f"Training MSE ({target}; interval means logged every {every} steps) averaged over the last "
                      f"quarter of training, mean ± sample std over seeds, and its paired difference to {ref}'s "
                      "(same seed, same data order and noise):", "",
                      f"| model | final-quarter MSE | minus {ref}'s (paired) |", "|---|---|---|"]
        tail = {}
        for v, (steps, ys) in curves.items():
            sel = steps > steps[-1] * 0.75
            tail[v] = ys[:, sel].mean(1)
        for v, vals in tail.items():
            diff = ""
            if ref in tail and v != ref and len(tail[ref]) == len(vals):
                d = vals - tail[ref]
                diff = f"{d.mean():+.5f}{_pm(d, 5)} ({int((d > 0).sum())}/{len(d)} seeds higher)"
            loss_lines.append(f"| {v} | {vals.mean():.5f}{_pm(vals, 5)} | {diff} |")
    verdicts = conclusions(results, agg) if labels == list(VARIANTS) else []

    objective = {"flow": "flow matching (linear interpolant, velocity target)"}.get(cfg.get("objective"), "DDPM")
    data = _DATA_NAMES.get(cfg.get("data", "fashion-mnist"), cfg.get("data"))
    if cfg.get("data_path"):
        data += f" ({cfg['data_path']})"
    ref_set = cfg.get("reference", {"split": "train", "num": 10_000})
    lines = [f"# {' vs '.join(labels)} on {data}: {objective}", "",
             f"Size {cfg.get('size')}/{cfg.get('patch')}, image size {cfg.get('image_size')}, "
             f"global batch {cfg.get('global_batch_size')}, lr {cfg.get('lr')}{_warmup_note(cfg)}, "
             f"{cfg.get('max_steps')} steps, "
             f"seeds {seeds}; the runs differ only in routing (and the options their labels name). Metrics: "
             f"{cfg.get('num_samples')} samples ({cfg.get('sampler')}, {cfg.get('num_sampling_steps')} steps, guidance "
             f"{cfg.get('cfg_scale')}; objective {cfg.get('objective', 'ddpm')}; sampling batches of 100, which "
             "matters only for expert choice over the batch) scored with the bundled Fashion-MNIST classifier's "
             f"features against {ref_set['num']:,} images of the {ref_set['split']} split of the training data. "
             "These numbers are not comparable with Inception-based FID/IS. ± is the sample standard deviation over "
             "seeds (ddof = 1)." + _pr_note(all_kinds), "",
             *([f"Command: `{results['command']}`", ""] if results.get("command") else []),
             *([f"Seeds {[x for x in asked if x not in seeds]} of the command are not finished yet and are left out; "
                "rerunning the command resumes them.", ""] if set(asked) - set(seeds) and not partial else []),
             *([f"**In progress**: no seed has finished for every variant yet; the tables show the runs finished so far "
                f"(seed {', '.join(map(str, seeds))}), each from one seed: no spreads, no verdicts.", ""]
               if partial else []),
             *([f"Runs taken over from an earlier comparison (same config and evaluation; their first "
                f"{next(r['reuse_check_steps'] for r in runs.values() if r.get('reused_from'))} training steps "
                "retrained here to bit-identical losses): "
                + ", ".join(f"{k} from `{r['reused_from']}`" for k, r in runs.items() if r.get("reused_from")), ""]
               if any(r.get("reused_from") for r in runs.values()) else []),
             "Train times are wall-clock seconds on a machine shared with other work (and paused at times), not a "
             "speed comparison: benchmarks/bench_switch.py and benchmarks/bench_moe.py measure time per step side by "
             "side" + (" (benchmarks/results/bench_moe.md has the flow training steps of DiT, Switch-DiT, TC-MoE and "
                       "EC-MoE at XS/4)" if any(r["model"].startswith(("TC-MoE", "EC-MoE")) for r in runs.values())
                       else "") + ". "
             "Active params: the parameters that act on one token (token-routed variants: the experts a token "
             "does not reach left out); GFLOPs count the active experts." + _sampling_cost(runs), "",
             "| model | params (M) | active params (M) | GFLOPs | step | FID | IS | precision | recall | wall-clock train "
             "time (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    mark_old = len(all_kinds) > 1  # both kinds in one table: the older ones marked
    for v, steps in agg.items():
        for s, m in steps.items():
            fmt = (lambda key, d=2: "mixed features" if np.isnan(m[key][0]) else
                   f"{m[key][0]:.{d}f}" + (f" ± {m[key][1]:.{d}f}" if m[key][2] > 1 else "") +
                   (" †" if key in ("precision", "recall") and mark_old and pr_kinds[v, s] == {"penultimate"} else ""))
            lines.append(f"| {v} | {info[v]['params']:.2f} | {info[v]['active']:.2f} | {info[v]['gflops']:.4f} | {s} | "
                         f"{fmt('fid')} | {fmt('is_mean')} | {fmt('precision', 3)} | {fmt('recall', 3)} | "
                         f"{np.mean(info[v]['time']):.0f} |")
    lines += loss_lines
    lines += _step_time_lines(results, labels)
    lines += pair_lines(results, agg, labels)
    lines += routing_lines(results)
    lines += token_routing_lines(results, labels, out)
    if verdicts:
        lines += ["", "## Conclusion, checkpoint by checkpoint", "",
                  "Is Switch-DiT's FID lower? The gap is given in seed standard deviations (the gap over the pooled "
                  "sample std of the two variants across seeds); 'paired seeds' compares runs with the same seed, data "
                  "order and noise. The answer is **yes** or **no** only when the gap exceeds 2 seed std and every "
                  "paired seed agrees; otherwise it is **within seed noise**.", "", *verdicts]
    discussion = out / "discussion.md"  # a hand-written reading of the numbers, kept when the report is rewritten
    if discussion.is_file():
        lines += ["", "## Discussion", "", "(written by hand from the numbers above; `discussion.md`)", "",
                  discussion.read_text().strip()]
    pics = "![FID vs steps](fid_vs_steps.png) ![FID vs GFLOPs](fid_vs_gflops.png)"
    if curves:
        pics += " ![training loss vs steps](loss_vs_steps.png)"
    lines += ["", pics, ""]
    for img in sorted(out.glob("*_grid.png")) + sorted(out.glob("*routing_map.png")) + \
            sorted(out.glob("*routing_affinity.png")):
        lines.append(f"![{img.stem}]({img.name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


__all__ = ["run_comparison", "write_report", "parse_variant", "paired_comparison", "VARIANTS"]
