"""Ship a trained Fashion-MNIST Switch-DiT as the package's pretrained model (what `--pretrained fashion-mnist`
loads), with its card: config, the command that trained it, and its scores.

    python scripts/export_pretrained.py results/pretrained-fashion-mnist/checkpoints/step_0008000.pt \
        --train-command "switch-dit train ..." [--eval-samples 5000]

Writes switch_dit/pretrained/switch-dit-fashion-mnist.safetensors (EMA weights, float16, config in the
metadata), switch_dit/pretrained/switch-dit-fashion-mnist.json (the card) and docs/pretrained/fashion-mnist_grid.png.
The evaluation draws --eval-samples samples (label i % 10, per-sample seeds) with the model's default sampler
and scores them against the 10,000 Fashion-MNIST test images with the bundled classifier's features.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from switch_dit import checkpoint as ckpt  # noqa: E402
from switch_dit.sample import PRETRAINED, PRETRAINED_DIR, class_grid, load_model_for_sampling, sample_images  # noqa: E402
from switch_dit.sample import write_grid  # noqa: E402

NAME = "fashion-mnist"
MAX_BYTES = 10 * 1024 * 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="the training checkpoint to ship")
    ap.add_argument("--train-command", required=True, help="the exact command that trained it")
    ap.add_argument("--sampler", default="dpm++", help="the shipped default sampler")
    ap.add_argument("--num-sampling-steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="the shipped default guidance")
    ap.add_argument("--eval-samples", type=int, default=5000, help="0 skips the evaluation")
    ap.add_argument("--out-dir", default=str(PRETRAINED_DIR))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "pretrained" / "fashion-mnist_grid.png"))
    args = ap.parse_args(argv)

    state = ckpt.load(args.ckpt)
    config = dict(state["config"])
    # sampling defaults a user of --pretrained gets; where it was trained is not part of the model
    config.update(sampler=args.sampler, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                  results_dir="results/pretrained-fashion-mnist", resume=None, device="auto")
    state["config"] = config
    out = Path(args.out_dir) / PRETRAINED[NAME]
    ckpt.export_model(state, out, torch.float16)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size / 2**20:.1f} MB, over the 10 MB the package allows: ship a smaller model")

    model, cfg, step = load_model_for_sampling(str(out))
    card = {"file": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "bytes": size,
            "weights": "EMA, float16", "step": step, "model": cfg.model,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "data": "Fashion-MNIST train (60,000), 28x28", "train_command": args.train_command,
            "note": "trained in several sittings with --resume auto, which is exact: the weights equal one run of "
                    "the command", "config": config}
    with torch.no_grad():
        grid = class_grid(model, cfg, model.num_classes, per_class=10, seed=0)
    write_grid(args.grid, grid, scale=2)
    if args.eval_samples:
        from switch_dit.evaluate.features import ClassifierExtractor
        from switch_dit.evaluate.run import reference_features, score

        t0 = time.time()
        images = sample_images(model, cfg, args.eval_samples, "cpu", batch_size=250, seed_base=0, progress=True)
        seconds = time.time() - t0
        extractor = ClassifierExtractor("cpu")
        ref, _, _ = reference_features(extractor, "fashion-mnist", None, "test", cfg.image_size, None)
        feats, logits = extractor(images)
        metrics = score(images, extractor, ref, extracted=(feats, logits))
        labels = np.arange(len(images)) % model.num_classes
        card["evaluation"] = {
            "num_samples": len(images), "sampler": cfg.sampler, "steps": cfg.num_sampling_steps,
            "cfg_scale": cfg.cfg_scale, "seeds": "sample i: seed i, label i % 10",
            "reference": "Fashion-MNIST test set (10,000 images), bundled classifier features",
            "fid": metrics["fid"], "precision": metrics["precision"], "recall": metrics["recall"],
            "is_mean": metrics["is_mean"], "class_accuracy": float((logits.argmax(1) == labels).mean()),
            "cpu_seconds_per_image": seconds / len(images), "cpu_threads": torch.get_num_threads()}
    (Path(args.out_dir) / PRETRAINED[NAME].replace(".safetensors", ".json")).write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: v for k, v in card.items() if k != "config"}, indent=1))
    return card


if __name__ == "__main__":
    main()
