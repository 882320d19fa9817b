"""Speed of the Switch-DiT pieces, measured side by side with interleaved repetitions and medians.

    python benchmarks/bench_switch.py [--device cpu|cuda] [--reps 15]

Prints four figures: the fast SMoE vs a gather/scatter reference, the Switch-DiT-S/2 / DiT-S/2 training
step ratio (prior loss included), the sampling-step ratio, and achieved training FLOP/s over the machine's
matmul FLOP/s.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from switch_dit import create_diffusion, create_model
from switch_dit.models.routing import SwitchRouter, reference_switch_mask


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of repetitions, samples, tokens, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def checked_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The benchmark's device, usable here, and an --out that is not a file: otherwise a one-line usage error."""
    from switch_dit.utils.dist import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        ap.error(f"--out {out} is a file; give a folder for the results")
    return device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int, device, warmup: int = 2) -> dict:
    """Median seconds of each callable, run in turn within each repetition so drift hits all alike."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, device, warmup).items()}


def paired_ratio(times: dict, a: str, b: str) -> tuple[float, float, float]:
    """Median and quartiles over repetitions of a's time / b's time in the same repetition: slow drift of a shared
    machine cancels in each pair, and the quartiles show what is left of the noise."""
    r = [x / y for x, y in zip(times[a], times[b])]
    if len(r) < 2:
        return r[0], r[0], r[0]
    q1, med, q3 = statistics.quantiles(r, n=4, method="inclusive")  # within the data, even for 2 reps
    return med, q1, q3


def interleaved_times(fns: dict, reps: int, device, warmup: int = 2) -> dict:
    """Seconds of each callable in each repetition, run in turn within a repetition."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def bench_smoe(device, reps):
    B, L, D, M, k = 32, 256, 384, 3, 2
    router = SwitchRouter(D, M, k).to(device)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    t_emb = torch.randn(B, D, device=device, requires_grad=True)
    t = torch.randint(0, 1000, (B,), device=device)
    grad = torch.randn(B, L, D, device=device)

    def fast():
        router(x, t, t_emb).backward(grad)

    def reference():
        reference_switch_mask(router, x, t_emb).backward(grad)

    r = interleaved({"fast": fast, "reference": reference}, reps, device)
    return r["reference"] / r["fast"], r


def _train_step(model, diffusion, opt, x, y):
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_train(device, reps, batch=8):
    diffusion = create_diffusion()
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps, models = {}, {}
    for name in ("DiT-S/2", "Switch-DiT-S/2"):
        torch.manual_seed(0)
        model = create_model(name, input_size=32).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        models[name] = (model, opt)
        steps[name] = (lambda m=model, o=opt: _train_step(m, diffusion, o, x, y))
    r = interleaved(steps, reps, device)
    # FLOPs of one training step (forward + backward), counted by torch.
    flops = {}
    for name, (model, opt) in models.items():
        with FlopCounterMode(display=False) as counter:
            _train_step(model, diffusion, opt, x, y)
        flops[name] = counter.get_total_flops()
    return r["Switch-DiT-S/2"] / r["DiT-S/2"], r, flops


def bench_sample(device, reps, batch=16):
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    t = torch.full((batch,), 500, device=device)
    fns = {}
    for name in ("DiT-S/2", "Switch-DiT-S/2"):
        torch.manual_seed(0)
        model = create_model(name, input_size=32).to(device).eval()
        with torch.no_grad():
            for r in model.switch_routers:
                r.expert_weight.normal_(0, 0.02)

        def step(m=model):
            with torch.no_grad():
                m(x, t, y)

        fns[name] = step
    r = interleaved(fns, reps, device)
    return r["Switch-DiT-S/2"] / r["DiT-S/2"], r


def matmul_flops(device, reps, n=1024):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    r = interleaved({"mm": lambda: a @ b}, reps, device)
    return 2 * n**3 / r["mm"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=positive_int, default=15)
    args = ap.parse_args()
    device = checked_args(ap, args)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} reps={args.reps}")
    speedup, r = bench_smoe(device, args.reps)
    print(f"SMoE fwd+bwd (B=32, 256 tokens, D=384, M=3, k=2): merged {r['fast'] * 1e3:.1f} ms, "
          f"gather/scatter {r['reference'] * 1e3:.1f} ms -> speed-up {speedup:.2f}x (target >= 2.5)")
    ratio, r, step_flops = bench_train(device, args.reps)
    flop_ratio = step_flops["Switch-DiT-S/2"] / step_flops["DiT-S/2"]
    print(f"training step (32x32x4, batch 8, prior loss included): DiT-S/2 {r['DiT-S/2'] * 1e3:.1f} ms, "
          f"Switch-DiT-S/2 {r['Switch-DiT-S/2'] * 1e3:.1f} ms -> ratio {ratio:.3f} (target <= 1.10; "
          f"FLOP ratio {flop_ratio:.3f})")
    flops = step_flops["Switch-DiT-S/2"] / r["Switch-DiT-S/2"]
    ratio, r = bench_sample(device, args.reps)
    print(f"sampling step (eval forward, batch 16): DiT-S/2 {r['DiT-S/2'] * 1e3:.1f} ms, "
          f"Switch-DiT-S/2 {r['Switch-DiT-S/2'] * 1e3:.1f} ms -> ratio {ratio:.3f} (target <= 1.10)")
    peak = matmul_flops(device, args.reps)
    print(f"training throughput: {flops / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.1f} GFLOP/s matmul "
          f"-> {flops / peak:.2f} of matmul peak (aim > 0.6 on CPU)")


if __name__ == "__main__":
    main()
