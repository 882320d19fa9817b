"""Malformed files, each read by every command that takes one (sample, analyze, evaluate, export, train --resume):
exit code 2, one line on stderr naming the problem, no traceback, and no allocation beyond a few GB
(the commands run in one process under an address-space limit)."""
import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY, run_cli

LIMIT_GB = 4.0


def _pt(folder: Path, name: str, obj) -> None:
    torch.save(obj, folder / f"{name}.pt")


def _raw(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)


def make_malformed(folder: Path, ckpt: Path, export: Path) -> int:
    """Write the malformed inputs; return how many."""
    from safetensors.torch import load_file, save_file

    good = torch.load(ckpt, weights_only=False)
    blob = ckpt.read_bytes()
    _raw(folder, "ckpt_empty.pt", b"")
    _raw(folder, "ckpt_truncated.pt", blob[: len(blob) // 2])
    _raw(folder, "ckpt_random.pt", os.urandom(4096))
    _raw(folder, "ckpt_pickle_list.pt", pickle.dumps([1, 2, 3]))
    _pt(folder, "ckpt_plain_dict", {"a": 1})
    _pt(folder, "ckpt_top_list", [good["ema"]])

    def variant(name, change):
        s = copy.deepcopy(good)
        change(s)
        _pt(folder, f"ckpt_{name}", s)

    w0 = "blocks.0.attn.qkv.weight"
    variant("no_config", lambda s: s.pop("config"))
    variant("config_list", lambda s: s.update(config=[1, 2]))
    variant("config_model_int", lambda s: s["config"].update(model=123))
    variant("config_model_unknown", lambda s: s["config"].update(model="Switch-DiT-Q/3"))
    variant("config_image_size_negative", lambda s: s["config"].update(image_size=-5))
    variant("config_lr_string", lambda s: s["config"].update(lr="fast"))
    variant("ema_list", lambda s: s.update(ema=[1, 2]))
    variant("ema_empty", lambda s: s.update(ema={}))
    variant("ema_missing_key", lambda s: s["ema"].pop(w0))
    variant("ema_extra_key", lambda s: s["ema"].update({"blocks.9.extra": torch.zeros(3)}))
    variant("ema_shape_off_by_one", lambda s: s["ema"].update({w0: torch.zeros(577, 192)}))
    variant("ema_int_weights", lambda s: s["ema"].update({w0: s["ema"][w0].long()}))
    variant("ema_nan", lambda s: s["ema"][w0].fill_(float("nan")))
    variant("ema_inf", lambda s: s["ema"][w0].fill_(float("inf")))
    variant("ema_value_not_tensor", lambda s: s["ema"].update({w0: [1.0, 2.0]}))
    variant("model_not_dict", lambda s: s.update(model="weights"))
    variant("in_channels_claims_3", lambda s: s.update(in_channels=3))
    variant("input_size_claims_huge", lambda s: s.update(input_size=100000))
    variant("num_classes_claims_huge", lambda s: s.update(num_classes=10 ** 9))
    variant("num_classes_string", lambda s: s.update(num_classes="ten"))
    variant("step_string", lambda s: s.update(step="x"))
    variant("step_negative", lambda s: s.update(step=-4))
    variant("rng_not_dict", lambda s: s.update(rng=[1]))
    variant("opt_empty", lambda s: s.update(opt={}))
    variant("health_string", lambda s: s.update(health="fine"))
    variant("class_names_ints", lambda s: s.update(class_names=[1, 2]))
    variant("pos_embed_missing", lambda s: s["ema"].pop("pos_embed"))
    variant("pos_embed_not_square", lambda s: s["ema"].update(pos_embed=torch.zeros(1, 15, 192)))
    variant("patch_weight_3d", lambda s: s["ema"].update({"x_embedder.proj.weight": torch.zeros(192, 1, 2)}))
    variant("half_converted_authors_names", lambda s: s["ema"].update(
        {"routers.0.f_gate.1.weight": s["ema"].pop("blocks.0.router.gate.1.weight")}))
    variant("format_wrong", lambda s: s.update(format="switch-dit/train-state/999"))
    variant("config_image_size_wrong", lambda s: s["config"].update(image_size=16))

    meta = {}
    from safetensors import safe_open
    with safe_open(str(export), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(export))
    ex_blob = export.read_bytes()
    _raw(folder, "export_empty.safetensors", b"")
    _raw(folder, "export_random.safetensors", os.urandom(4096))
    _raw(folder, "export_truncated.safetensors", ex_blob[: len(ex_blob) // 2])

    def export_variant(name, meta_change=None, tensor_change=None, metadata=True):
        m, t = dict(meta), dict(tensors)
        if meta_change:
            meta_change(m)
        if tensor_change:
            tensor_change(t)
        save_file(t, str(folder / f"export_{name}.safetensors"), metadata=m if metadata else None)

    export_variant("no_metadata", metadata=False)
    export_variant("no_config", lambda m: m.pop("config"))
    export_variant("config_not_json", lambda m: m.update(config="{model: "))
    export_variant("config_json_list", lambda m: m.update(config="[1, 2]"))
    export_variant("config_no_model", lambda m: m.update(config=json.dumps(
        {k: v for k, v in json.loads(m["config"]).items() if k != "model"})))
    export_variant("config_model_unknown", lambda m: m.update(config=json.dumps(
        {**json.loads(m["config"]), "model": "Nope-XS/2"})))
    export_variant("in_channels_negative", lambda m: m.update(in_channels="-1"))
    export_variant("input_size_huge", lambda m: m.update(input_size="100000"))
    export_variant("num_classes_huge", lambda m: m.update(num_classes="1000000000"))
    export_variant("num_classes_text", lambda m: m.update(num_classes="ten"))
    export_variant("step_text", lambda m: m.update(step="abc"))
    export_variant("format_wrong", lambda m: m.update(format="other/1"))
    export_variant("class_names_not_json", lambda m: m.update(class_names="[a, b"))
    export_variant("missing_tensor", tensor_change=lambda t: t.pop(w0))
    export_variant("extra_tensor", tensor_change=lambda t: t.update(extra=torch.zeros(2)))
    export_variant("shape_off_by_one", tensor_change=lambda t: t.update({w0: torch.zeros(577, 192)}))
    export_variant("nan_weights", tensor_change=lambda t: t.update({w0: torch.full_like(t[w0], float("nan"))}))
    export_variant("config_image_size_wrong", lambda m: m.update(config=json.dumps(
        {**json.loads(m["config"]), "image_size": 16})))
    export_variant("flow_config_sigma_weights", lambda m: m.update(config=json.dumps(
        {**json.loads(m["config"]), "objective": "flow", "sampler": "heun"})))

    images = np.zeros((8, 8, 8, 1), np.uint8)
    _raw(folder, "npz_empty.npz", b"")
    _raw(folder, "npz_random.npz", os.urandom(2048))
    np.savez(folder / "npz_no_arr0.npz", images=images)
    np.savez(folder / "npz_float.npz", arr_0=images.astype(np.float32))
    np.savez(folder / "npz_3d.npz", arr_0=images[..., 0])
    np.savez(folder / "npz_two_channels.npz", arr_0=np.zeros((8, 8, 8, 2), np.uint8))
    np.savez(folder / "npz_object.npz", arr_0=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(folder / "npz_one_image.npz", arr_0=images[:1])
    good_npz = folder / "npz_truncated.npz"
    np.savez(good_npz, arr_0=np.zeros((64, 8, 8, 1), np.uint8))
    good_npz.write_bytes(good_npz.read_bytes()[:300])
    np.savez(folder / "npz_huge_claimed_shape.npz", arr_0=np.zeros((64, 8, 8, 1), np.uint8))
    raw = (folder / "npz_huge_claimed_shape.npz").read_bytes()  # the .npy header claims 10^7 images
    (folder / "npz_huge_claimed_shape.npz").write_bytes(raw.replace(b"(64,", b"(9999999,", 1))
    return len(list(folder.iterdir()))


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    run = root / "run"
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", run) == 0
    ckpt = run / "checkpoints" / "step_0000001.pt"
    assert run_cli("export", ckpt, "--out", root / "good.safetensors") == 0
    folder = root / "files"
    folder.mkdir()
    n = make_malformed(folder, ckpt, root / "good.safetensors")
    yield folder, n
    shutil.rmtree(root, ignore_errors=True)  # ~2.5 GB of checkpoint copies: not kept until the session ends


def test_every_malformed_file_is_one_line_under_a_memory_limit(malformed):
    folder, n = malformed
    assert n >= 60
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("SWITCH_DIT_DEBUG", None)
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("malformed_runner.py")), str(folder),
                          str(LIMIT_GB)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(runs) >= 200
    bad = [r for r in runs if r["code"] != 2 or len(r["lines"]) != 1 or r["traceback"]]
    assert not bad, "\n".join(f"{r['file']} {r['command']}: {r['code']} {r['lines'][:3]}" for r in bad[:15])
    # each line names the file (or its folder) it is about
    unnamed = [f"{r['file']} {r['command']}: {r['lines'][0]}" for r in runs
               if r["file"].rsplit(".", 1)[0] not in r["lines"][0] and "--" not in r["lines"][0]]
    assert not unnamed, "\n".join(unnamed[:10])
