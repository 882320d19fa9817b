"""Speed of the token-routed FFN mixtures, measured side by side (interleaved repetitions; ratios are medians of
the ratio within each repetition, with their quartiles).

    python benchmarks/bench_moe.py [--device cpu|cuda] [--reps 15] [--dim 384] [--out DIR]

For batch 64 at 16 and at 256 tokens a sample: forward + backward of the dense FFN (D -> 4D -> D), of TC-MoE
(token choice, 8 experts, top-2 + 1 shared, capacity factor 1.25: the training setting; eager, each expert on
exactly its tokens, and with the fixed (E, capacity) buffers that torch.compile runs) and EC-MoE (expert choice
over the batch, capacity factor 2 + 1 shared), all with the same active parameters per token, and of the
straightforward per-expert loops the tests check them against, and the mixture's matmuls alone (shared expert
plus routed experts on balanced groups, and on groups padded to the busiest expert: the floor the routing adds
to). Prints ms and the ratios MoE / dense (target <= 1.3 on a CPU) and loop / MoE; ``--out`` writes
bench_moe.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switch import checked_args, interleaved_times, paired_ratio, positive_int  # noqa: E402

import switch_dit.models.moe as moe_module  # noqa: E402
from switch_dit.models.layers import Mlp  # noqa: E402
from switch_dit.models.moe import (ExpertChoiceMoE, TokenChoiceMoE, reference_expert_choice,  # noqa: E402
                                   reference_token_choice)


def _fwd_bwd(fn, x, grad, params=()):
    def run():
        x.grad = None
        for p in params:  # as a training step's zero_grad(set_to_none=True): no gradient accumulation timed
            p.grad = None
        fn(x).backward(grad)
    return run


def bench(device, reps: int, batch: int, tokens: int, dim: int) -> dict:
    torch.manual_seed(0)
    dense = Mlp(dim, 4 * dim).to(device).train()
    tc = TokenChoiceMoE(dim, 8, 2, 1, capacity_factor=1.25).to(device).train()
    tc_static = TokenChoiceMoE(dim, 8, 2, 1, capacity_factor=1.25).to(device).train()
    tc_static.load_state_dict(tc.state_dict())
    tc_static.static_dispatch = True  # the compiled path's fixed buffers, run eagerly
    ec = ExpertChoiceMoE(dim, 8, 2.0, 1, scope="batch").to(device).train()
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    grad = torch.randn(batch, tokens, dim, device=device)
    def tc_loop(v):  # eager TC-MoE held to its per-expert loop, which small groups trade for padded buffers
        saved, moe_module.LOOP_ROWS = moe_module.LOOP_ROWS, 0
        try:
            return tc(v)[0]
        finally:
            moe_module.LOOP_ROWS = saved

    # The matmuls alone: the shared expert on every token plus the routed experts on (E, rows, D) buffers of
    # balanced groups (k T / E rows each, the FLOP floor) or groups padded to the busiest expert (what TC-MoE's
    # padded dispatch computes); the rest of TC-MoE's time is routing (gate, sort, gather, weighting, scatter).
    with torch.no_grad():
        routed = torch.bincount(tc.gate_probs(x.reshape(-1, dim)).topk(tc.top_k, dim=-1).indices.reshape(-1),
                                minlength=tc.num_experts)
    group_rows = {"balanced": tc.top_k * batch * tokens // tc.num_experts,
                  "padded": min(int(routed.max()), tc.capacity(batch * tokens))}

    params = [p for m in (dense, tc, tc_static, ec) for p in m.parameters()]

    def matmuls(n):
        xs = torch.randn(batch * tokens, dim, device=device, requires_grad=True)
        xe = torch.randn(tc.num_experts, n, dim, device=device, requires_grad=True)
        gs, ge = torch.randn_like(xs), torch.randn_like(xe)

        def run():
            xs.grad = xe.grad = None
            for p in params:
                p.grad = None
            torch.autograd.backward([tc.shared(xs), tc.experts(xe)], [gs, ge])
        return run

    fns = {"dense FFN": _fwd_bwd(dense, x, grad, params),
           "matmuls balanced": matmuls(group_rows["balanced"]),
           "matmuls padded": matmuls(group_rows["padded"]),
           "TC-MoE": _fwd_bwd(lambda v: tc(v)[0], x, grad, params),
           "TC-MoE static buffers": _fwd_bwd(lambda v: tc_static(v)[0], x, grad, params),
           "TC-MoE loop dispatch": _fwd_bwd(tc_loop, x, grad, params),
           "EC-MoE": _fwd_bwd(lambda v: ec(v)[0], x, grad, params),
           "TC-MoE loop": _fwd_bwd(lambda v: reference_token_choice(tc, v), x, grad, params),
           "EC-MoE loop": _fwd_bwd(lambda v: reference_expert_choice(ec, v), x, grad, params)}
    times = interleaved_times(fns, reps, device)
    r = {k: statistics.median(v) for k, v in times.items()}
    active = {k: sum(p.numel() for p in m.parameters()) for k, m in (("dense FFN", dense),)}
    per_expert = sum(p[0].numel() for p in tc.experts.parameters())
    moe_active = sum(p.numel() for p in tc.parameters()) - (tc.num_experts - tc.top_k) * per_expert
    tc.pop_stats(), tc_static.pop_stats()
    busiest = (routed.max() * tc.num_experts / routed.sum()).item()  # how unevenly the untrained router splits
    return {"batch": batch, "tokens": tokens, "dim": dim, "ms": {k: v * 1e3 for k, v in r.items()},
            "tc_busiest_expert_over_mean": busiest,
            "active_params": {"dense FFN": active["dense FFN"], "MoE": moe_active},
            **_ratios(times, {"TC-MoE / dense": ("TC-MoE", "dense FFN"), "EC-MoE / dense": ("EC-MoE", "dense FFN"),
                              "TC-MoE static buffers / dense": ("TC-MoE static buffers", "dense FFN"),
                              "TC-MoE loop dispatch / TC-MoE": ("TC-MoE loop dispatch", "TC-MoE"),
                              "matmuls balanced / dense": ("matmuls balanced", "dense FFN"),
                              "matmuls padded / dense": ("matmuls padded", "dense FFN"),
                              "TC loop / TC-MoE": ("TC-MoE loop", "TC-MoE"),
                              "EC loop / EC-MoE": ("EC-MoE loop", "EC-MoE")})}


def _q(res: dict, name: str, key: str = "ratios") -> str:
    lo, hi = res["ratio_quartiles"][name]
    return f"{res[key][name]:.2f} ({lo:.2f}-{hi:.2f})"


def _ratios(times: dict, pairs: dict) -> dict:
    """Paired ratios (median over repetitions of the ratio within one repetition) and their quartiles."""
    q = {name: paired_ratio(times, a, b) for name, (a, b) in pairs.items()}
    return {"ratios": {k: v[0] for k, v in q.items()}, "ratio_quartiles": {k: [v[1], v[2]] for k, v in q.items()}}


def bench_steps(device, reps: int, size: str = "XS", patch: int = 4, image: int = 16, batch: int = 64) -> dict:
    """Training-step time (flow matching, AdamW) of DiT, Switch-DiT, TC-MoE and EC-MoE at the comparison's setting
    (XS/4, 16x16 grey, batch 64), interleaved: the time-per-step column the comparison's wall clock cannot give."""
    from switch_dit import create_model
    from switch_dit.flow import FlowMatching

    flow = FlowMatching()
    x = torch.randn(batch, 1, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns = {}
    for variant in ("DiT", "Switch-DiT", "TC-MoE", "EC-MoE"):
        torch.manual_seed(0)
        model = create_model(f"{variant}-{size}/{patch}", input_size=image, in_channels=1, num_classes=10,
                             learn_sigma=False).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(m=model, o=opt):
            t = torch.rand(batch, device=device)
            loss = flow.training_losses(m, x, t, dict(y=y))["loss"]
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        fns[variant] = step
    times = interleaved_times(fns, reps, device)
    q = _ratios(times, {k: (k, "DiT") for k in times})
    return {"setting": f"{size}/{patch}, {image}x{image}x1, batch {batch}, flow matching, AdamW",
            "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}, "ratio_to_dit": q["ratios"],
            "ratio_quartiles": q["ratio_quartiles"]}


def write_outputs(out: Path, data: dict) -> None:
    """bench_moe.json (everything measured) and bench_moe.md (its table), from one run's results."""
    head, rows, steps = data["setup"], data["rows"], data["steps"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_moe.json").write_text(json.dumps(data, indent=1))
    lines = [f"`python benchmarks/bench_moe.py` ({head}); forward + backward, medians of interleaved repetitions; "
             "ratios: the median of the ratio within each repetition (quartiles in brackets), so a ratio need not "
             "equal the ratio of the ms columns. TC-MoE: eager dispatch (buffers as long as the busiest group "
             "for small groups, else a loop over experts); loop dispatch: held to the loop. Matmuls alone: "
             "the shared expert and the routed experts on groups of k T / E rows (balanced) or as long as the "
             "busiest group (padded), without routing; where TC-MoE pads (64 x 16), its time above the padded matmuls is "
             "the routing; where it loops over experts (64 x 256), nothing is padded.",
             "", "| batch x tokens | dense FFN (ms) | TC-MoE (ms) | EC-MoE (ms) | TC-MoE / dense | EC-MoE / dense "
             "| TC-MoE static buffers / dense | TC-MoE loop dispatch / TC-MoE | TC loop / TC-MoE "
             "| EC loop / EC-MoE | matmuls alone, balanced / dense | matmuls alone, padded / dense |",
             "|---" * 12 + "|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['batch']} x {r['tokens']} | {ms['dense FFN']:.1f} | {ms['TC-MoE']:.1f} | "
                     f"{ms['EC-MoE']:.1f} | {_q(r, 'TC-MoE / dense')} | {_q(r, 'EC-MoE / dense')} | "
                     f"{_q(r, 'TC-MoE static buffers / dense')} | {_q(r, 'TC-MoE loop dispatch / TC-MoE')} | "
                     f"{_q(r, 'TC loop / TC-MoE')} | {_q(r, 'EC loop / EC-MoE')} | "
                     f"{_q(r, 'matmuls balanced / dense')} | {_q(r, 'matmuls padded / dense')} |")
    if steps:
        lines += ["", f"Whole training steps ({steps['setting']}):", "", "| model | ms / step | / DiT |",
                  "|---|---|---|"] + [f"| {k} | {v:.1f} | {_q(steps, k, 'ratio_to_dit')} |"
                                      for k, v in steps["ms"].items()]
    (out / "bench_moe.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=positive_int, default=15)
    ap.add_argument("--dim", type=positive_int, default=384, help="hidden size D (384 = the S models)")
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[16, 256], help="tokens per sample")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--out", help="folder for bench_moe.json and bench_moe.md")
    ap.add_argument("--steps", action="store_true",
                    help="also time whole training steps of DiT, Switch-DiT, TC-MoE and EC-MoE at XS/4, batch 64")
    args = ap.parse_args(argv)
    device = checked_args(ap, args)
    head = f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} reps={args.reps}"
    print(head)
    rows = []
    for tokens in args.tokens:
        res = bench(device, args.reps, args.batch, tokens, args.dim)
        rows.append(res)
        ms, ra = res["ms"], res["ratios"]
        print(f"batch {args.batch} x {tokens} tokens, D={args.dim} (active params: dense {res['active_params']['dense FFN']:,}, "
              f"MoE {res['active_params']['MoE']:,}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
        print("  " + ", ".join(f"{k} = {_q(res, k)}" for k in ra) + "   (target: MoE / dense <= 1.3)")
    steps = None
    if args.steps:
        steps = bench_steps(device, args.reps)
        print(f"training step ({steps['setting']}): " + ", ".join(
            f"{k} {v:.1f} ms ({_q(steps, k, 'ratio_to_dit')}x DiT)" for k, v in steps["ms"].items()))
    if args.out:
        write_outputs(Path(args.out), {"setup": head, "rows": rows, "steps": steps})
    return rows


if __name__ == "__main__":
    main()
