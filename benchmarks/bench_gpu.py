"""The GPU measurement in one command: training and sampling throughput, MFU, memory and host syncs.

    python benchmarks/bench_gpu.py                      # on a GPU: S/2 and XL/2, 256x256 latents (32x32x4)
    python benchmarks/bench_gpu.py --device cpu --tiny  # the same code on small sizes (CI runs it)

For DiT-S/2, Switch-DiT-S/2, DiT-XL/2 and Switch-DiT-XL/2 (tiny: the XS/4 pair on 8x8x4) it measures
training images/s without and with torch.compile (bf16 autocast and fused AdamW on CUDA, prior loss included,
the matched prior computed outside the compiled forward as the trainer does), achieved TFLOP/s from torch's
FLOP counter, MFU against the device's dense bf16 peak (a table for A100/H100/H200, else a measured matmul
peak), peak memory, host syncs per training step (torch.cuda.set_sync_debug_mode), sampling images/s (DDPM
250 steps, guidance 1.5), the Switch-DiT / DiT ratios, and latent extraction images/s with a tiny local
AutoencoderKL. Writes OUT/bench_gpu.json and OUT/bench_gpu.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switch import checked_args, positive_int  # noqa: E402
from switch_dit import create_diffusion, create_model  # noqa: E402
from switch_dit.config import Config  # noqa: E402
from switch_dit.sample import sample_latents, sampling_diffusion  # noqa: E402
from switch_dit.train import LossWatch  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) of the data-centre parts this project targets.
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_peak(device, measured_reps: int = 5) -> tuple[float, str]:
    """(FLOP/s, where it comes from): the table for known GPUs, else a measured large matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16.items():
            if key in name:
                return peak, f"{name}: dense bf16 peak from the data sheet"
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(measured_reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]), f"measured {n}x{n} {str(dtype)[6:]} matmul"


class SyncCounter:
    """Counts the host syncs CUDA reports while active (set_sync_debug_mode('warn') turns each into a warning)."""

    def __init__(self, device):
        self.device, self.count, self._ctx = device, 0, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            self._ctx = warnings.catch_warnings(record=True)
            self._log = self._ctx.__enter__()
            warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            torch.cuda.set_sync_debug_mode(0)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
            self._ctx.__exit__(*exc)


def make_train_step(model, diffusion, device, compiled: bool, compile_backend: str):
    """One training step as the trainer runs it (prior target outside the forward, autocast, fused AdamW)."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=cuda or None)
    fwd = torch.compile(model, backend=compile_backend) if compiled else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    watch = LossWatch(device)  # the trainer's divergence check, so the sync count is the trainer's

    def step(x, y, t, noise):
        kwargs = dict(y=y)
        with amp:
            if model.prior is not None:
                kwargs["prior_target"] = model.matched_prior_table()
            loss = diffusion.training_losses(fwd, x, t, kwargs, noise=noise)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        read = watch.read()
        if read is not None and not math.isfinite(read[1]):
            raise RuntimeError(f"the benchmark's loss became {read[1]}")
        watch.push(0, loss, None)
        opt.step()
        return loss

    return step


def bench_training(name, size, channels, batch, steps, device, compiled, compile_backend):
    torch.manual_seed(0)
    model = create_model(name, input_size=size, in_channels=channels, num_classes=1000).to(device).train()
    diffusion = create_diffusion()
    step = make_train_step(model, diffusion, device, compiled, compile_backend)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x)
    for _ in range(3):  # warm-up (and compilation)
        step(x, y, t, noise)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with SyncCounter(device) as syncs:
        step(x, y, t, noise)
        _sync(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step(x, y, t, noise)
        _sync(device)
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:
        make_train_step(model, diffusion, device, False, compile_backend)(x, y, t, noise)
    sec = statistics.median(times)
    return {"model": name, "compiled": compiled, "batch": batch, "step_s": sec, "images_per_s": batch / sec,
            "flops_per_step": counter.get_total_flops(),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "host_syncs_per_step": syncs.count if device.type == "cuda" else None}


def largest_batch(name, size, channels, batch, device, compiled, compile_backend, steps):
    """Train at `batch`, halving it on out-of-memory (the issue asks for 256 or the largest that fits)."""
    while True:
        try:
            return bench_training(name, size, channels, batch, steps, device, compiled, compile_backend)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def bench_sampling(name, size, channels, batch, num_steps, device):
    torch.manual_seed(0)
    model = create_model(name, input_size=size, in_channels=channels, num_classes=1000).to(device).eval()
    cfg = Config(model=name, sampler="ddpm", num_sampling_steps=num_steps, cfg_scale=1.5, data="latents")
    diffusion = sampling_diffusion(cfg)
    labels = torch.randint(0, 1000, (batch,))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    warm = Config(**{**cfg.__dict__, "num_sampling_steps": 1})
    with torch.no_grad(), amp:
        sample_latents(model, sampling_diffusion(warm), warm, labels, range(batch), device)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        sample_latents(model, diffusion, cfg, labels, range(batch), device)
        _sync(device)
    sec = time.perf_counter() - t0
    return {"model": name, "batch": batch, "steps": num_steps, "seconds": sec, "images_per_s": batch / sec}


def bench_vae(device, image_size, batch):
    """Latent extraction throughput with a small AutoencoderKL made here (no weights are downloaded)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return {"skipped": "diffusers is not installed (pip install 'switch-dit[latent]')"}
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32).to(device).eval()
    x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    with torch.no_grad():
        vae.encode(x[:2]).latent_dist.mean  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        vae.encode(x).latent_dist.mean
        vae.encode(x.flip(-1)).latent_dist.mean  # both flips, as extract-latents stores them
        _sync(device)
    sec = time.perf_counter() - t0
    return {"image_size": image_size, "batch": batch, "images_per_s": batch / sec,
            "note": "a small randomly initialised AutoencoderKL (4 levels, 32-64 channels), not sd-vae-ft-ema"}


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        pairs, size, channels = [("DiT-XS/4", "Switch-DiT-XS/4")], 8, 4
        batch, steps, sample_batch, sample_steps, vae_size, vae_batch = 4, 2, 4, 3, 32, 2
    else:
        pairs, size, channels = [("DiT-S/2", "Switch-DiT-S/2"), ("DiT-XL/2", "Switch-DiT-XL/2")], 32, 4
        batch, steps, sample_batch, sample_steps, vae_size, vae_batch = args.batch, args.steps, 64, 250, 256, 32
    peak, peak_src = device_peak(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peak_flops": peak, "peak_source": peak_src,
           "compile_backend": args.compile_backend, "train": [], "sample": [], "ratios": {}}
    modes = [False] + ([True] if args.compile else [])
    for pair in pairs:
        for name in pair:
            for compiled in modes:
                r = largest_batch(name, size, channels, batch, device, compiled, args.compile_backend, steps)
                r["tflops"] = r["flops_per_step"] / r["step_s"] / 1e12
                r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
                out["train"].append(r)
                print(f"train {name:16s} compile={compiled!s:5s} batch {r['batch']:4d}: {r['images_per_s']:9.1f} img/s, "
                      f"{r['tflops']:7.2f} TFLOP/s, MFU {r['mfu']:.3f}, syncs/step {r['host_syncs_per_step']}, "
                      f"peak mem {r['peak_memory_gb']}", flush=True)
            out["sample"].append(bench_sampling(name, size, channels, sample_batch, sample_steps, device))
            print(f"sample {name:16s} {out['sample'][-1]['images_per_s']:.2f} img/s ({sample_steps} DDPM steps, "
                  "guidance 1.5)", flush=True)
        dit, sdit = pair
        for compiled in modes:
            a = next(r for r in out["train"] if r["model"] == dit and r["compiled"] == compiled)
            b = next(r for r in out["train"] if r["model"] == sdit and r["compiled"] == compiled)
            out["ratios"][f"{sdit} / {dit} train step{' (compiled)' if compiled else ''}"] = (
                (b["step_s"] / b["batch"]) / (a["step_s"] / a["batch"]))
        a = next(r for r in out["sample"] if r["model"] == dit)
        b = next(r for r in out["sample"] if r["model"] == sdit)
        out["ratios"][f"{sdit} / {dit} sampling time"] = a["images_per_s"] / b["images_per_s"]
    out["vae"] = bench_vae(device, vae_size, vae_batch)
    return out


def markdown(res: dict) -> str:
    lines = [f"GPU benchmark on {res['device']} (torch {res['torch']}, {res['date']}); MFU against "
             f"{res['peak_flops'] / 1e12:.0f} TFLOP/s ({res['peak_source']}).", "",
             "| model | compiled | batch | images/s | TFLOP/s | MFU | peak memory (GB) | host syncs / step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["train"]:
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        syncs = r["host_syncs_per_step"] if r["host_syncs_per_step"] is not None else "-"
        lines.append(f"| {r['model']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | {r['images_per_s']:.1f} | "
                     f"{r['tflops']:.2f} | {r['mfu']:.3f} | {mem} | {syncs} |")
    lines += ["", "| sampling | batch | steps | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['steps']} | {r['images_per_s']:.2f} |" for r in res["sample"]]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    vae = res["vae"]
    lines += ["", f"Latent extraction: {vae['images_per_s']:.1f} images/s at {vae['image_size']}x{vae['image_size']} "
              f"({vae['note']})" if "images_per_s" in vae else f"Latent extraction: {vae.get('skipped')}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small sizes (the CPU check in CI)")
    ap.add_argument("--batch", type=positive_int, default=256, help="training batch (halved on out-of-memory)")
    ap.add_argument("--steps", type=positive_int, default=10, help="timed training steps per configuration")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile runs")
    ap.add_argument("--compile-backend", default="inductor", help="'eager' checks the compile path without codegen")
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_gpu.json and bench_gpu.md")
    args = ap.parse_args(argv)
    checked_args(ap, args)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
    (out / "bench_gpu.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
