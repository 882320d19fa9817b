"""The README's result numbers, generated from the committed JSON so they cannot drift.

    python scripts/readme_results.py          # rewrite the generated blocks of README.md in place
    python scripts/readme_results.py --check  # exit 1 if a block differs from what the JSON says (a test runs it)

A block is the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; everything else in the
README is written by hand and carries no number from the results.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from switch_dit.compare import _p, _paired, label_of, paired_comparison  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name / "results.json").read_text())


def _sd(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _fids(res: dict, label: str, step: int) -> list[float]:
    return [r["evals"][str(step)]["fid"] for r in sorted(res["runs"].values(), key=lambda r: r["seed"])
            if label_of(r) == label and str(step) in r["evals"]]


def clearly_lowest(res: dict, label: str, others: list[str], step: int) -> bool:
    """Beyond 2 pooled sample std of the seed spread and lower in every paired seed, against each other variant."""
    return all(paired_comparison(*_paired(res, label, o, step))["verdict"] == "yes" for o in others)


def _cell(res, label, step, labels) -> str:
    f = _fids(res, label, step)
    if not f:
        return ""
    text = f"{np.mean(f):.1f}" + (f" ± {_sd(f):.1f}" if len(f) > 1 else "")
    return f"**{text}**" if clearly_lowest(res, label, [v for v in labels if v != label], step) else text


def compare_table() -> str:
    ddpm, flow = _load("compare"), _load("compare-flow")
    labels = ["DiT", "DTR", "Switch-DiT"]
    steps = sorted({int(s) for r in ddpm["runs"].values() for s in r["evals"]})
    lines = ["| steps | " + " | ".join(f"{v} (DDPM)" for v in labels) + " | " +
             " | ".join(f"{v} (flow)" for v in labels) + " |", "|---" * 7 + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(_cell(ddpm, v, s, labels) for v in labels) + " | " +
                     " | ".join(_cell(flow, v, s, labels) for v in labels) + " |")
    return "\n".join(lines)


def _tail(res: dict, folder: str, label: str) -> dict[int, float]:
    """Per seed: the mean training MSE over the last quarter of training (from each run's metrics.jsonl)."""
    out = {}
    for r in res["runs"].values():
        if label_of(r) != label:
            continue
        name = label.replace(":", "_").replace(",", "_").replace("/", "-")
        path = RESULTS / folder / "runs" / f"{name}_seed{r['seed']}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = max(m["step"] for m in rows)
        out[r["seed"]] = float(np.mean([m["train/mse"] for m in rows if m["step"] > 0.75 * last]))
    return out


def _gap_sentence(res: dict, a: str, b: str, step: int) -> str:
    c = paired_comparison(*_paired(res, a, b, step))
    sd = f"{c['gap_in_sd']:.1f} seed std" if c["gap_in_sd"] is not None else "no seed spread"
    rel = 100 * c["gap"] / np.mean(_fids(res, b, step))
    return (f"{abs(c['gap']):.2f} FID ({abs(rel):.1f}%) {'below' if c['gap'] > 0 else 'above'} {b} at {step:,} steps "
            f"({sd}, lower in {c['wins']}/{c['n']} paired seeds, paired t-test p = {_p(c['p'])}: "
            f"{c['verdict']})")


def _range(lo, hi, fmt="{:.1f}") -> str:
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def compare_facts() -> str:
    lines = []
    for name, title in (("compare", "DDPM"), ("compare-flow", "flow matching")):
        res = _load(name)
        steps = sorted({int(s) for r in res["runs"].values() for s in r["evals"]})
        parts = [_gap_sentence(res, "Switch-DiT", o, s) for o in ("DiT", "DTR") for s in steps]
        tails = {v: _tail(res, name, v) for v in ("DiT", "DTR", "Switch-DiT")}
        loss = []
        for o in ("DiT", "DTR"):
            d = np.array([tails[o][s] - tails["Switch-DiT"][s] for s in sorted(tails[o])])
            rel = 100 * d.mean() / np.mean(list(tails["Switch-DiT"].values()))
            loss.append(f"{o}'s is {d.mean():+.5f} ({rel:+.1f}%, higher in {int((d > 0).sum())}/{len(d)} seeds)")
        minutes = [r["train_seconds"] / 60 for r in res["runs"].values()]
        lines.append(f"- {title}: Switch-DiT's mean FID is " + "; ".join(parts) + ". Final-quarter training MSE "
                     f"against Switch-DiT's ({np.mean(list(tails['Switch-DiT'].values())):.5f}): " + "; ".join(loss)
                     + f". Training took {min(minutes):.0f}-{max(minutes):.0f} minutes per run (wall clock, "
                     "shared machine).")
    routing = []
    for name, title in (("compare", "DDPM"), ("compare-flow", "flow")):
        res = _load(name)
        recs = [r for r in res["runs"].values() if "prior_agreement" in r.get("routing", {})]
        seeds = sorted(r["seed"] for r in recs)
        agree = [100 * r["routing"]["prior_agreement"] for r in recs]
        shared = [r["routing"]["blocks_with_a_shared_expert"] for r in recs]
        routing.append(f"{title}: the map of seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} is "
                       f"recorded, {_range(min(agree), max(agree))}% equal to the matched prior, "
                       f"{_range(min(shared), max(shared), '{:d}')} of 6 blocks with a shared expert")
    lines.append("- Learned routing (final EMA models): " + "; ".join(routing) + ".")
    return "\n".join(lines)


def sampler_table() -> str:
    d = json.loads((RESULTS / "samplers" / "bench_samplers.json").read_text())
    fid = {(r["sampler"], r["steps"]): r["fid"] for r in d["runs"]}
    best = min(fid.values())
    dpm20, ddpm250 = fid[("dpm++", 20)], fid[("ddpm", 250)]
    lines = ["| steps | DDPM | DDIM | DPM-Solver++ |", "|---|---|---|---|"]
    for steps in sorted({s for _, s in fid}):
        cells = []
        for sampler in ("ddpm", "ddim", "dpm++"):
            v = fid.get((sampler, steps))
            cells.append("" if v is None else f"**{v:.1f}**" if v in (best, dpm20) else f"{v:.1f}")
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    seed0 = json.loads((RESULTS / "samplers-seed0" / "bench_samplers.json").read_text())
    other = {(r["sampler"], r["steps"]): r["fid"] for r in seed0["runs"]}
    shift = [100 * (other[k] / fid[k] - 1) for k in other]
    lines += ["", f"DPM-Solver++-20 against DDPM-250: {dpm20:.1f} vs {ddpm250:.1f}, "
              f"{100 * (dpm20 / ddpm250 - 1):.1f}% apart with {250 / 20:.1f}x fewer model calls; solved accurately "
              f"(250 steps) the probability-flow ODE gives DDIM {fid[('ddim', 250)]:.1f} and DPM-Solver++ "
              f"{fid[('dpm++', 250)]:.1f}. A second seed set (`--seed-base 0`) gives "
              + ", ".join(f"{s.upper() if s == 'ddpm' else 'DPM-Solver++' if s == 'dpm++' else s}-{n} {v:.1f}"
                          for (s, n), v in sorted(other.items()))
              + f": {min(shift):+.1f}% to {max(shift):+.1f}% against the first set, in the same order."]
    return "\n".join(lines)


def pretrained_table() -> str:
    card = json.loads((ROOT / "switch_dit" / "pretrained" / "switch-dit-fashion-mnist.json").read_text())
    e = card["evaluation"]
    return ("| classifier-FID | precision | recall | IS | samples recognised as their class | CPU time per image |\n"
            "|---|---|---|---|---|---|\n"
            f"| {e['fid']:.1f} | {e['precision']:.3f} | {e['recall']:.3f} | {e['is_mean']:.2f} | "
            f"{100 * e['class_accuracy']:.1f}% | {e['cpu_seconds_per_image']:.2f} s ({e['cpu_threads']} threads) |")


def moe_table() -> str:
    path = RESULTS / "moe-family" / "results.json"
    if not path.is_file():
        return "(the comparison is running; its results will appear here)"
    res = json.loads(path.read_text())
    labels = res["config"]["variants"]
    seeds = sorted({r["seed"] for r in res["runs"].values()
                    if all(any(label_of(q) == v and q["seed"] == r["seed"] and
                               q.get("finished_step") == res["config"]["max_steps"] and q.get("evals")
                               for q in res["runs"].values()) for v in labels)})
    if not seeds:
        done = sum(r.get("finished_step") == res["config"]["max_steps"] for r in res["runs"].values())
        return (f"(running: {done} of {len(labels) * len(res['config']['seeds'])} runs finished; the table appears "
                "when every variant of a seed is done)")
    res = {**res, "runs": {k: r for k, r in res["runs"].items() if r["seed"] in seeds}}
    steps = sorted({int(s) for r in res["runs"].values() for s in r["evals"]})
    info = {}
    for r in res["runs"].values():
        info.setdefault(label_of(r), r)
    lines = ["| variant | routing | params (M) | active (M) | GFLOPs | " +
             " | ".join(f"FID {s}" for s in steps) + " | I(t; expert) (bits) |", "|---" * (6 + len(steps)) + "|"]
    kinds = {"DiT": "none", "Switch-DiT": "timestep, prior", "Switch-DiT:lambda_dp=0": "timestep, no prior",
             "TC-MoE": "token choice", "EC-MoE": "expert choice", "DiffMoE": "expert choice, predicted capacity"}
    for v in labels:
        r = info[v]
        maps = [q["routing"]["expert_map"]["mean_timestep_information_bits"] for q in res["runs"].values()
                if label_of(q) == v and "expert_map" in q.get("routing", {})]
        nulls = [q["routing"]["expert_map"]["mean_null_information_bits"] for q in res["runs"].values()
                 if label_of(q) == v and "mean_null_information_bits" in q.get("routing", {}).get("expert_map", {})]
        bits = (f"{np.mean(maps):.2f}" + (f" ± {_sd(maps):.2f}" if len(maps) > 1 else "") +
                (f" (null {np.mean(nulls):.2f})" if nulls else "")) if maps else "-"
        lines.append(f"| {v} | {kinds.get(v, '')} | {r['params_m']:.2f} | {r.get('active_params_m', r['params_m']):.2f} "
                     f"| {r['gflops']:.4f} | " + " | ".join(_cell(res, v, s, labels) for s in steps) + f" | {bits} |")
    if len(seeds) > 1:
        lines += ["", f"Seeds {', '.join(map(str, seeds))}; FID mean ± sample std (bold: beyond 2 seed std below "
                  "every other variant, lower in every paired seed)."]
    else:
        lines += ["", f"Seed {seeds[0]} only so far: one seed has no spread to judge differences by."]
    return "\n".join(lines)


def bench_moe_table() -> str:
    d = json.loads((ROOT / "benchmarks" / "results" / "bench_moe.json").read_text())
    lines = ["| batch x tokens | TC-MoE / dense FFN | TC-MoE static buffers / dense | EC-MoE / dense FFN | target | "
             "TC-MoE's busiest expert / mean | TC-MoE held to the loop / TC-MoE | matmuls alone, balanced / dense "
             "| matmuls alone, padded / dense |", "|---|---|---|---|---|---|---|---|---|"]
    def cell(res, name, key="ratios"):
        lo, hi = res["ratio_quartiles"][name]
        return f"{res[key][name]:.2f} ({lo:.2f}-{hi:.2f})"

    for r in d["rows"]:
        lines.append(f"| {r['batch']} x {r['tokens']} | {cell(r, 'TC-MoE / dense')} | "
                     f"{cell(r, 'TC-MoE static buffers / dense')} | {cell(r, 'EC-MoE / dense')} | <= 1.3 | "
                     f"{r['tc_busiest_expert_over_mean']:.2f} | {cell(r, 'TC-MoE loop dispatch / TC-MoE')} | "
                     + (f"{cell(r, 'matmuls balanced / dense')} | {cell(r, 'matmuls padded / dense')} |"
                        if "matmuls balanced / dense" in r["ratios"] else "not measured | not measured |"))
    lines += ["", "Each cell: the median over repetitions of the time ratio within one repetition (quartiles in "
              "brackets)."]
    steps = d.get("steps")
    if steps:
        lines[-1] += (f" Whole training steps ({steps['setting']}): " +
                      ", ".join(f"{k} {cell(steps, k, 'ratio_to_dit')}x DiT" for k in steps["ratio_to_dit"]
                                if k != "DiT") + ".")
    return "\n".join(lines)


BLOCKS = {"compare-table": compare_table, "compare-facts": compare_facts, "sampler-table": sampler_table,
          "pretrained-table": pretrained_table, "moe-table": moe_table, "bench-moe": bench_moe_table}


def render(readme: str) -> str:
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no generated:{name} block")
        readme = pattern.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README.md's generated result blocks differ from docs/results; run python scripts/readme_results.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
