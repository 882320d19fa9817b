"""Samplers measured, not claimed: classifier-FID and wall time per image for DDPM, DDIM and DPM-Solver++.

    python benchmarks/bench_samplers.py --pretrained fashion-mnist            # the shipped model
    python benchmarks/bench_samplers.py --ckpt results/demo/checkpoints/step_0002500.pt --num-samples 2000

Every sampler draws the same samples (same per-sample seeds, same labels: sample i has class i % 10) from the
same model; FID uses the bundled Fashion-MNIST classifier's features against the 10,000 test images. Writes
OUT/bench_samplers.json, OUT/bench_samplers.md and OUT/fid_vs_steps.png after every setting; a rerun keeps the
settings already measured on the same model file with the same samples (--max-steps 50 now, the rest later;
--only ddpm:250 dpm++:250 for the most wanted first).
The target: DPM-Solver++ at 20 steps within 5% of DDPM-250's FID (12x fewer model calls).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from switch_dit.evaluate.features import ClassifierExtractor  # noqa: E402
from switch_dit.evaluate.run import reference_features, score  # noqa: E402
from switch_dit.sample import (compile_for_sampling, load_model_for_sampling, resolve_pretrained,  # noqa: E402
                               sample_images)

GRID = {"ddpm": (50, 250), "ddim": (10, 20, 50, 250), "dpm++": (10, 20, 50, 250)}
ORDER = [(k, s) for k, v in GRID.items() for s in v]  # (sampler, steps), the order of the table


def _sha256(path: str) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _machine(device: torch.device) -> str:
    import os
    import platform
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads of {os.cpu_count()}"


def _setting(text: str) -> tuple[str, int]:
    """'dpm++:20' -> ('dpm++', 20), one of the grid's settings."""
    sampler, _, steps = text.partition(":")
    if not steps.isdigit() or (sampler, int(steps)) not in ORDER:
        raise SystemExit(f"--only {text!r}: not a setting of the grid; use SAMPLER:STEPS, one of "
                         + ", ".join(f"{k}:{s}" for k, s in ORDER))
    return sampler, int(steps)


SAME_RUN = ("model", "sha256", "num_samples", "cfg_scale", "seed_base")  # a rerun reuses settings measured under these
SEED_BASE = 12345  # sample i has seed SEED_BASE + i (files written before --seed-base existed used it)


def run(args) -> dict:
    source = f"pretrained:{args.pretrained}" if args.pretrained else args.ckpt
    model, cfg, step = load_model_for_sampling(source)
    device = torch.device(args.device)
    model.to(device)
    if args.compile:
        compile_for_sampling(model)  # same float32 math, fused: about 1.3x on this CPU
    cfg.cfg_scale = args.cfg_scale
    extractor = ClassifierExtractor(str(device))
    ref, _, _ = reference_features(extractor, "fashion-mnist", args.data_path, "test", cfg.image_size, None)
    todo = [(k, s) for k, s in ORDER if s <= args.max_steps]
    if args.only:
        todo = [_setting(x) for x in args.only]  # in the order given: the most wanted first in a short sitting
    res = {"model": source, "sha256": _sha256(resolve_pretrained(source)), "step": step,
           "num_samples": args.num_samples, "cfg_scale": args.cfg_scale, "seed_base": args.seed_base,
           "reference": "Fashion-MNIST test set (10,000), bundled classifier features", "runs": []}
    # Resumable: settings already measured on this model with these samples are kept (a long CPU run can be
    # spread over several sittings); each result says on which machine its time was measured.
    out = Path(args.out)
    previous = json.loads((out / "bench_samplers.json").read_text()) if (out / "bench_samplers.json").exists() else {}
    previous.setdefault("seed_base", SEED_BASE)
    done = {(r["sampler"], r["steps"]): r for r in previous.get("runs", [])} \
        if all(previous.get(k) == res[k] for k in SAME_RUN) else {}
    def record(run: dict) -> None:
        done[(run["sampler"], run["steps"])] = run
        res["runs"] = [done[key] for key in ORDER if key in done]  # the table's order, whatever is measured first

    res["runs"] = [done[key] for key in ORDER if key in done]  # earlier results from the start: a kill loses none
    for sampler, steps in todo:
        if (sampler, steps) in done:
            continue
        cfg.sampler, cfg.num_sampling_steps = sampler, steps
        t0 = time.perf_counter()
        images = sample_images(model, cfg, args.num_samples, device, batch_size=args.batch_size,
                               seed_base=args.seed_base)
        seconds = time.perf_counter() - t0
        m = score(images, extractor, ref)
        calls = steps  # one model call per step for all three
        record({"sampler": sampler, "steps": steps, "model_calls": calls, "fid": m["fid"],
                "precision": m["precision"], "recall": m["recall"],
                "ms_per_image": 1e3 * seconds / args.num_samples,
                "machine": _machine(device) + (", compiled" if args.compile else "")})
        _summarise(res)
        write(res, out)  # after every setting
        print(f"{sampler:6s} {steps:4d} steps: FID {m['fid']:.2f}, {1e3 * seconds / args.num_samples:.1f} ms/image",
              flush=True)
    _summarise(res)
    return res


def _summarise(res: dict) -> None:
    ref_run = next((r for r in res["runs"] if r["sampler"] == "ddpm" and r["steps"] == 250), None)
    dpm20 = next((r for r in res["runs"] if r["sampler"] == "dpm++" and r["steps"] == 20), None)
    if ref_run and dpm20:
        res["dpm20_vs_ddpm250"] = dpm20["fid"] / ref_run["fid"]


def write(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_samplers.json").write_text(json.dumps(res, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sampler in GRID:
        pts = [(r["steps"], r["fid"]) for r in res["runs"] if r["sampler"] == sampler]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (= model calls)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"{res['num_samples']} samples, guidance {res['cfg_scale']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_steps.png", dpi=120)
    plt.close(fig)
    lines = [f"Samplers on {res['model']} (step {res['step']}): {res['num_samples']} samples, the same seeds "
             f"({res['seed_base']} + i) and labels (i % 10) for all, guidance {res['cfg_scale']}; "
             "FID from the bundled classifier's features against the Fashion-MNIST test set.", "",
             "| sampler | steps | FID | precision | recall | ms / image | measured on |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['ms_per_image']:.1f} | {r.get('machine', '')} |" for r in res["runs"]]
    missing = [f"{k} {s}" for k, s in ORDER if not any(r["sampler"] == k and r["steps"] == s for r in res["runs"])]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (rerunning the command adds them)."]
    if "dpm20_vs_ddpm250" in res:
        lines += ["", f"DPM-Solver++ 20 steps / DDPM 250 steps FID: {res['dpm20_vs_ddpm250']:.3f} (target <= 1.05)"]
    (out / "bench_samplers.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", choices=["fashion-mnist"])
    src.add_argument("--ckpt", help="a checkpoint or exported model trained on Fashion-MNIST")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--seed-base", type=int, default=SEED_BASE,
                    help="sample i has seed SEED_BASE + i; another value (and --out) measures FID's seed noise")
    ap.add_argument("--max-steps", type=int, default=250, help="skip settings with more steps (quick checks)")
    ap.add_argument("--only", nargs="+", metavar="SAMPLER:STEPS",
                    help="measure just these settings, in this order (e.g. ddpm:250 dpm++:250)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (times include compiling)")
    ap.add_argument("--data-path", help="Fashion-MNIST folder (default: the Debian package's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="docs/results/samplers")
    args = ap.parse_args(argv)
    res = run(args)
    write(res, Path(args.out))
    return res


if __name__ == "__main__":
    main()
