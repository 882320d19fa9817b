"""The shipped Fashion-MNIST Switch-DiT: its file and card agree, it samples what it is asked for, and every
command that takes a model takes --pretrained fashion-mnist."""
import hashlib
import json

import numpy as np
import torch

from switch_dit.checkpoint import load_exported
from switch_dit.sample import PRETRAINED, PRETRAINED_DIR
from tests.helpers import run_cli

FILE = PRETRAINED_DIR / PRETRAINED["fashion-mnist"]
CARD = FILE.with_suffix(".json")


def test_file_and_card_agree():
    card = json.loads(CARD.read_text())
    data = FILE.read_bytes()
    assert len(data) <= 10 * 1024 * 1024 and card["bytes"] == len(data)
    assert card["sha256"] == hashlib.sha256(data).hexdigest()
    from safetensors import safe_open
    with safe_open(str(FILE), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}
    weights, meta = load_exported(FILE)
    assert meta["weights"] == "ema" and meta["step"] == card["step"] and meta["config"]["model"].startswith("Switch-DiT")
    assert meta["input_size"] >= 28 and meta["config"]["data"] == "fashion-mnist"
    assert card["train_command"].startswith("switch-dit train") and f"--max-steps {card['step']}" in card["train_command"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_the_cards_config_agrees_with_its_training_command():
    """Every option the command sets that changes the weights has that value in the recorded config; the others
    (when to stop, save and draw grids) are the last sitting's, and the card says so."""
    from switch_dit.cli import build_parser
    from switch_dit.config import PRESETS

    card = json.loads(CARD.read_text())
    args = build_parser().parse_args(card["train_command"].split()[1:])
    cadence = {"max_steps", "ckpt_every", "sample_every", "keep_last", "resume", "results_dir", "time_budget"}
    sampling = {"sampler", "num_sampling_steps", "cfg_scale"}  # the shipped model's defaults, set by the export
    given = {k: v for k, v in vars(args).items() if k in card["config"]}
    want = {**PRESETS[args.preset], **given}
    wrong = {k: (v, card["config"][k]) for k, v in want.items() if k not in cadence | sampling and card["config"][k] != v}
    assert not wrong, wrong
    differ = {k for k in cadence if k in want and card["config"].get(k) != want[k]}
    assert differ <= {"max_steps", "ckpt_every", "sample_every"}
    assert all(f"--{k.replace('_', '-')}" in card["config_note"] for k in differ)
    assert "sampling defaults" in card["config_note"]


def test_samples_are_recognised_as_their_class(tmp_path):
    """100 samples (10 per class) from `sample --pretrained fashion-mnist` with its default fast sampler
    (DPM-Solver++, 20 steps): the bundled classifier names the requested class for at least 80 of them."""
    from PIL import Image

    from switch_dit.evaluate.features import ClassifierExtractor

    out = tmp_path / "grid.png"
    assert run_cli("sample", "--pretrained", "fashion-mnist", "--per-class", 10, "--out", out, "--no-progress",
                   "--scale", 1, "--no-row-names") == 0
    grid = np.asarray(Image.open(out))
    size, pad = 28, 2  # make_grid's layout: 2-pixel borders around 28x28 tiles, one row per class
    assert grid.shape == (10 * (size + pad) + pad, 10 * (size + pad) + pad)
    tiles = np.stack([grid[pad + r * (size + pad): pad + r * (size + pad) + size,
                           pad + c * (size + pad): pad + c * (size + pad) + size] for r in range(10) for c in range(10)])
    _, logits = ClassifierExtractor("cpu")(tiles[..., None])
    wanted = np.repeat(np.arange(10), 10)
    accuracy = float((logits.argmax(1) == wanted).mean())
    assert accuracy >= 0.8, accuracy
    assert tiles.std(axis=0).mean() > 10  # samples of a class differ from each other (no collapse)


def test_analyze_and_evaluate_take_the_pretrained_model(tmp_path):
    assert run_cli("analyze", "--pretrained", "fashion-mnist", "--out", tmp_path / "a") == 0
    summary = json.loads((tmp_path / "a" / "routing.json").read_text())
    assert summary and (tmp_path / "a" / "task_expert_map.png").is_file()
    assert run_cli("evaluate", "--pretrained", "fashion-mnist", "--num-samples", 20, "--num-sampling-steps", 10,
                   "--ref-split", "test", "--ref-limit", 200, "--no-progress", "--out", tmp_path / "e.json") == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_samples"] == 20 and np.isfinite(result["fid"])
