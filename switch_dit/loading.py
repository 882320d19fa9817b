"""Every model format read in one place, checked before a model is built.

``load_model(path)`` reads a switch-dit training checkpoint, an exported ``.safetensors``, a shipped model
(``pretrained:NAME``), a checkpoint of the authors' Switch-DiT / DTR code (its recorded config supplies the
model, noise schedule and sampling defaults), a released DiT state dict, or a bare ``model.state_dict()`` in
this project's names. The architecture is read from the tensors' shapes (never from a size claimed in
metadata alone); the model is first built on the 'meta' device and its keys and shapes compared with the
file's, so a file of another model is a one-line error naming the first differences before any memory is
allocated.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, _runnable, config_from_dict
from .factory import build_model
from .models.dit import DiT

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED = {"fashion-mnist": "switch-dit-fashion-mnist.safetensors"}


def resolve_pretrained(path: str) -> str:
    """'pretrained:NAME' (what --pretrained NAME passes) -> the packaged file; other paths unchanged."""
    if not str(path).startswith("pretrained:"):
        return path
    name = str(path).split(":", 1)[1]
    if name not in PRETRAINED:
        raise ValueError(f"--pretrained {name}: no such model; available: {', '.join(PRETRAINED)}")
    file = PRETRAINED_DIR / PRETRAINED[name]
    if not file.is_file():
        raise FileNotFoundError(f"--pretrained {name}: {file} is missing from this installation (it ships as "
                                "package data): reinstall switch-dit from its repository (pip install -e .), or "
                                "train your own with 'switch-dit demo' and pass its checkpoint")
    return str(file)


def plain_config(obj):
    """A config a foreign checkpoint carries (OmegaConf DictConfig/ListConfig/nodes, argparse.Namespace, all as
    inert UnloadedObject stand-ins, or plain containers) as plain dicts, lists and values; None if unreadable."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {k: plain_config(v) for k, v in obj.items() if isinstance(k, str)}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    state = getattr(obj, "state", None)
    if isinstance(obj, ckpt.UnloadedObject) and isinstance(state, dict):
        if "_content" in state:  # an OmegaConf container
            return plain_config(state["_content"])
        if "_val" in state:  # an OmegaConf value node
            return plain_config(state["_val"])
        return plain_config(state)  # argparse.Namespace and plain objects: their __dict__
    return None


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def authors_settings(config) -> dict:
    """The Config fields a checkpoint of the authors' Switch-DiT code records in its (hydra) config: model,
    routing, noise schedule and their sampling defaults; {} when there is none."""
    c = plain_config(config)
    if not isinstance(c, dict):
        return {}
    out = {}
    schedule = _get(c, "general", "schedule_name")
    if schedule is not None:
        if schedule not in ("linear", "cosine"):
            raise ckpt.CheckpointError(f"the checkpoint's config names the noise schedule {schedule!r}; this code has "
                                       "linear and cosine: pass --noise-schedule to choose one")
        out["noise_schedule"] = schedule
    name, routing = _get(c, "models", "name"), _get(c, "routing", "name")
    if isinstance(name, str) and "-" in name:
        variant = {"DMoE": "Switch-DiT", "DTR": "DTR"}.get(routing, "DiT")
        out["model"] = f"{variant}-{name.split('-', 1)[1]}"
    for ours, path in (("top_k", ("routing", "param", "k")), ("num_experts", ("routing", "param", "num_experts")),
                       ("lambda_dp", ("routing", "w_JSD")), ("cfg_scale", ("eval", "cfg_scale")),
                       ("num_sampling_steps", ("eval", "num_sampling_steps")),
                       ("image_size", ("general", "image_size"))):
        v = _get(c, *path)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[ours] = v
    return out


def dit_args_settings(args) -> dict:
    """What a DiT-style training script's argparse Namespace (saved as 'args') records: model, image size."""
    a = plain_config(args)
    if not isinstance(a, dict):
        return {}
    out = {}
    if isinstance(a.get("model"), str) and a["model"].startswith("DiT-"):
        out["model"] = a["model"]
    if isinstance(a.get("image_size"), int):
        out["image_size"] = a["image_size"]
    return out


# --- the architecture, read from the tensors ---------------------------------------------------------------

def _shape(state: dict, key: str, ndim: int, path) -> tuple:
    t = state.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        have = "missing" if t is None else f"shaped {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ckpt.CheckpointError(f"{path}: the weights have no usable {key} ({ndim}-d tensor expected, {have}); "
                                   "it is not a complete DiT-family model")
    return tuple(t.shape)


def infer_architecture(state: dict, path) -> dict:
    """in_channels, input_size, patch, hidden, depth, rows of the label table, learn_sigma, routing family and
    mixture sizes, from the shapes of a state dict in this project's names."""
    _, L, D = _shape(state, "pos_embed", 3, path)
    w = _shape(state, "x_embedder.proj.weight", 4, path)
    out_w = _shape(state, "final_layer.linear.weight", 2, path)
    rows = _shape(state, "y_embedder.embedding_table.weight", 2, path)[0]
    grid = math.isqrt(L)
    if grid * grid != L or w[0] != D or w[2] != w[3] or out_w[1] != D:
        raise ckpt.CheckpointError(f"{path}: inconsistent shapes (pos_embed {L} x {D}, patch embedding {w}); the file "
                                   "is damaged or not a DiT-family model")
    C, p = w[1], w[2]
    out_channels = out_w[0] // (p * p)
    if out_channels not in (C, 2 * C) or out_w[0] % (p * p):
        raise ckpt.CheckpointError(f"{path}: the final layer has {out_w[0]} outputs, not {p * p} x {C} or x {2 * C}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    arch = {"in_channels": C, "patch": p, "input_size": grid * p, "hidden": D, "depth": depth, "rows": rows,
            "learn_sigma": out_channels == 2 * C, "family": "DiT/DTR"}
    if any(".router.gate." in k for k in state):
        arch["family"] = "Switch-DiT"
        arch["num_experts"] = _shape(state, "blocks.0.router.expert_weight", 3, path)[0]
    elif any(k.endswith(".mlp.gate_weight") for k in state):
        # DiffMoE's capacity predictor sets it apart; TC-MoE's and EC-MoE's weights look alike
        arch["family"] = "DiffMoE" if any(".mlp.predictor." in k for k in state) else "TC-MoE/EC-MoE"
        E, _, H = _shape(state, "blocks.0.mlp.experts.w1", 3, path)
        shared = state.get("blocks.0.mlp.shared.fc1.weight")
        s = 0 if shared is None else shared.shape[0] // H
        arch.update(moe_experts=E, moe_shared=s, moe_top_k=max(1, round(4 * D / H) - s))
    return arch


_FAMILY = {"DiT": "DiT/DTR", "DTR": "DiT/DTR", "Switch-DiT": "Switch-DiT", "TC-MoE": "TC-MoE/EC-MoE",
           "EC-MoE": "TC-MoE/EC-MoE", "DiffMoE": "DiffMoE"}


def _check_fits(cfg: Config, arch: dict, path) -> None:
    """The model name (and mixture options) against what the tensors say, before anything is built."""
    from .models.dit import MODEL_SIZES, parse_model_name

    variant, size, patch = parse_model_name(cfg.model)
    depth, hidden, _ = MODEL_SIZES[size]
    if _FAMILY[variant] != arch["family"]:
        where = f"{_size_name(arch)}/{arch['patch']}"
        fix = {"DiT/DTR": f"--model DiT-{where} (or DTR-{where})", "Switch-DiT": f"--model Switch-DiT-{where}",
               "TC-MoE/EC-MoE": f"--model TC-MoE-{where} or EC-MoE-{where} (their weights look alike: name the one "
                                "that trained them, and its --moe-scope for EC-MoE)",
               "DiffMoE": f"--model DiffMoE-{where}"}[arch["family"]]
        guess = {"DiT/DTR": "DiT", "Switch-DiT": "Switch-DiT", "TC-MoE/EC-MoE": "token-routed",
                 "DiffMoE": "DiffMoE"}[arch["family"]]
        raise ckpt.CheckpointError(f"{path} holds a {guess} model, not {cfg.model}: pass {fix}")
    if (depth, hidden, patch) != (arch["depth"], arch["hidden"], arch["patch"]):
        raise ckpt.CheckpointError(f"{path} holds a model of depth {arch['depth']}, width {arch['hidden']}, patch "
                                   f"{arch['patch']}, not {cfg.model} ({depth}, {hidden}, {patch}): pass --model "
                                   f"{variant}-{_size_name(arch)}/{arch['patch']}")


def _size_name(arch: dict) -> str:
    from .models.dit import MODEL_SIZES

    for name, (d, h, _) in MODEL_SIZES.items():
        if (d, h) == (arch["depth"], arch["hidden"]):
            return name
    return "?"


def build_checked(cfg: Config, state: dict, path, num_classes: int | None = None, check_only: bool = False):
    """Build cfg's model for these weights: sizes from the tensors, keys and shapes compared on the 'meta' device
    first, then loaded strictly; every mismatch is a one-line CheckpointError. num_classes None: a foreign
    state dict, whose routing sizes, learned variance and classes are read from the tensors too."""
    arch = infer_architecture(state, path)
    _check_fits(cfg, arch, path)
    if num_classes is None:
        if arch["family"] in ("TC-MoE/EC-MoE", "DiffMoE"):
            cfg.moe_experts, cfg.moe_shared, cfg.moe_top_k = arch["moe_experts"], arch["moe_shared"], arch["moe_top_k"]
        if arch["family"] == "Switch-DiT":
            cfg.num_experts = arch["num_experts"]
            cfg.top_k = min(cfg.top_k, cfg.num_experts)
        cfg.learn_sigma = arch["learn_sigma"]
        # one row: unconditional; more: the classes and the null class (Meta's DiT keeps it for one class too)
        num_classes = 1 if arch["rows"] == 1 else arch["rows"] - 1
        if arch["rows"] == 1:
            cfg.class_dropout_prob = 0.0
        elif cfg.class_dropout_prob == 0:
            cfg.class_dropout_prob = 0.1  # the null row is there: guidance works
    with torch.device("meta"):
        probe = build_model(cfg, arch["in_channels"], arch["input_size"], num_classes)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k} {have[k]} (expected {want[k]})" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if missing or extra or wrong:
        parts = [f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []
        parts += [f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else []
        parts += [f"shape of {', '.join(wrong[:2])}"] if wrong else []
        raise ckpt.CheckpointError(f"{path} does not fit {cfg.model} with {num_classes} classes: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise ckpt.CheckpointError(f"{path} has non-finite weights ({', '.join(bad[:3])}); use an earlier checkpoint")
    # DiffMoE's thresholds are probabilities: outside [0, 1] an expert takes every token or none
    odd = [k for k in want if k.endswith(".mlp.threshold") and state[k].is_floating_point()
           and not bool(((state[k] >= 0) & (state[k] <= 1)).all())]
    if odd:
        raise ckpt.CheckpointError(f"{path}: {odd[0]} holds values outside [0, 1] where DiffMoE's thresholds are "
                                   "probabilities; the file is damaged or edited: use another checkpoint")
    floats = [k for k, v in probe.state_dict().items() if v.is_floating_point() and not state[k].is_floating_point()]
    if floats:
        raise ckpt.CheckpointError(f"{path}: {floats[0]} holds {state[floats[0]].dtype} values where weights are "
                                   "floating point; the file is damaged")
    if check_only:
        return None
    model = build_model(cfg, arch["in_channels"], arch["input_size"], num_classes)
    model.load_state_dict({k: v for k, v in state.items() if k in want}, strict=True)
    return model


def load_model(path: str, use_ema: bool = True, cfg_overrides: Config | None = None):
    """(model in eval mode, Config, step) from any supported file (see the module docstring). cfg_overrides
    (the command line's --model, --image-size, --top-k, --noise-schedule) completes or overrides what a foreign
    file records; the fields a user gave explicitly are in ``cfg_overrides._given``."""
    from .models.compat import authors_variant, from_authors_state_dict, strip_wrapper_prefixes

    path = resolve_pretrained(path)
    if Path(path).is_dir():
        if (Path(path) / "config.json").is_file():
            model = _load_folder(Path(path), use_ema, cfg_overrides)
            return model, model.config, model.step
        found = ckpt.list_checkpoints(Path(path) / "checkpoints")
        if found:  # a training run's folder: point at its newest checkpoint
            raise ckpt.CheckpointError(f"{path} is a training run's folder; give one of its checkpoints, e.g. the "
                                       f"newest, {found[-1]}")
        raise ckpt.CheckpointError(f"{path} is a folder without config.json; give a checkpoint file (.pt or "
                                   ".safetensors) or a model folder written by save_pretrained")
    given = set(getattr(cfg_overrides, "_given", ()))
    if str(path).endswith(".safetensors"):  # an exported model (switch-dit export, or --pretrained)
        weights, meta = ckpt.load_exported(path)
        cfg = _config_from_record(meta["config"], path)
        _refuse_model_override(cfg, cfg_overrides, given, path)
        _refuse_recorded(cfg, cfg_overrides, given, path)
        model = build_checked(_override(cfg, cfg_overrides, given, SAMPLING_FIELDS), weights, path,
                              meta["num_classes"])
        _agree(model, meta, path, cfg)
        return _attach(model.eval(), cfg, meta["step"], meta.get("class_names"), str(path)), cfg, meta["step"]
    saved = ckpt.load(path)
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if isinstance(fmt, str) and fmt.startswith("switch-dit/") and fmt != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{path} is a switch-dit file of another format ({fmt!r}; this version reads "
                                   f"{ckpt.FORMAT!r}): use the version that wrote it, or export it there")
    if isinstance(saved, dict) and saved.get("format") == ckpt.FORMAT:
        check_training_state(saved, path)
        cfg = _config_from_record(saved["config"], path)
        _refuse_model_override(cfg, cfg_overrides, given, path)
        state = saved["ema" if use_ema else "model"]
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(f"{path}: its {'ema' if use_ema else 'model'} entry is not a state dict; "
                                       "the checkpoint is damaged: use another one")
        _refuse_recorded(cfg, cfg_overrides, given, path)
        model = build_checked(_override(cfg, cfg_overrides, given, SAMPLING_FIELDS), state, path,
                              _int(saved["num_classes"], "num_classes", path))
        _agree(model, saved, path, cfg)
        step = saved.get("step")
        return _attach(model.eval(), cfg, step, saved.get("class_names"), str(path)), cfg, step
    state = saved.get("ema" if use_ema else "model", saved.get("model", saved)) if isinstance(saved, dict) else None
    if isinstance(state, dict):
        state = strip_wrapper_prefixes(state)
    if not isinstance(state, dict) or "pos_embed" not in state or "x_embedder.proj.weight" not in state:
        raise ckpt.CheckpointError(f"{path} is neither a switch-dit checkpoint nor a DiT state dict")
    recorded = {}
    if isinstance(saved, dict):
        recorded = authors_settings(saved.get("config")) or dit_args_settings(saved.get("args"))
    cfg = Config(model="DiT-XL/2", image_size=256)
    for k, v in recorded.items():
        setattr(cfg, k, v)
    cfg = _override(cfg, cfg_overrides, given if cfg_overrides is not None and given else
                    (_non_default(cfg_overrides) if cfg_overrides is not None else set()))
    variant = authors_variant(state)
    if variant != "DiT":
        state = from_authors_state_dict(state)
    explicit = (given or _non_default(cfg_overrides)) if cfg_overrides is not None else set()
    if "model" not in recorded and "model" not in explicit:
        cfg.model = _name_from_tensors(state, path, variant)  # nobody named the model: the tensors do
    _sizes_from_tensors(cfg, state, path, explicit)
    cfg.validate()
    model = build_checked(cfg, state, path)
    _fit_foreign_config(cfg, cfg_overrides, explicit, model, path)
    names = [str(i) for i in range(model.num_classes)]  # other code's files name no classes (nor their data)
    return _attach(model.eval(), cfg, None, names, str(path)), cfg, None


def _sizes_from_tensors(cfg: Config, state: dict, path, explicit: set) -> None:
    """The routing sizes the tensors fix, set before the options are checked against each other (top_k=4 is
    valid for weights of 6 experts, whatever the default number of experts); explicit values are compared after
    the build. Nothing is set where the named model is of another family (its build says so)."""
    from .models.dit import parse_model_name

    try:
        arch = infer_architecture(state, path)
        family = _FAMILY.get(parse_model_name(cfg.model.partition(":")[0])[0])
    except ValueError:  # (a damaged file or a bad name: reported by the build and the checks)
        return
    if family != arch["family"]:
        return
    keys = {"Switch-DiT": ("num_experts",), "TC-MoE/EC-MoE": ("moe_experts", "moe_shared", "moe_top_k"),
            "DiffMoE": ("moe_experts", "moe_shared", "moe_top_k")}.get(family, ())
    for k in keys:
        if k not in explicit:
            setattr(cfg, k, arch[k])
    if family == "Switch-DiT" and "top_k" not in explicit:
        cfg.top_k = min(cfg.top_k, cfg.num_experts)


def _fit_foreign_config(cfg: Config, overrides: Config | None, explicit: set, model: DiT, path) -> None:
    """Another program's state dict: the sizes its tensors fix win over the defaults, and an explicit value that
    contradicts them is refused (it would be recorded, exported and evaluated against, yet not be the model's)."""
    wrong = [f"{k}={getattr(overrides, k)} (the weights have {getattr(cfg, k)})"
             for k in ("moe_experts", "moe_shared", "moe_top_k", "num_experts")
             if k in explicit and getattr(overrides, k) != getattr(cfg, k)]
    size = model.x_embedder.grid_size * model.patch_size
    if cfg.vae is None and cfg.data != "latents" and model.in_channels in (1, 3):  # pixels: the image is the input
        if "image_size" in explicit and cfg.image_size != size:
            wrong.append(f"image_size={cfg.image_size} (the position embedding is for {size} x {size} images)")
        cfg.image_size = size
    if wrong:
        raise ckpt.CheckpointError(f"{path} does not fit {', '.join(wrong)}: leave those options out (the weights "
                                   "set them) or give the values the weights have")


def _refuse_model_override(cfg: Config, overrides: Config | None, given: set, path) -> None:
    """--model is for other code's state dicts; a switch-dit file records its model, and a different name is an error."""
    if overrides is not None and "model" in given and overrides.model != cfg.model:
        from .models.dit import parse_model_name
        parse_model_name(overrides.model)  # an unknown name: its own one-line error
        raise ckpt.CheckpointError(f"{path} holds a {cfg.model} model (recorded in the file); --model "
                                   f"{overrides.model} applies only to state dicts of other code: leave it out")


def check_training_state(saved, path, for_resume: bool = False) -> None:
    """The structure of a switch-dit training checkpoint, before anything of it is used: every entry of the
    expected type (weights as dicts of tensors, sizes and step as integers, ...); one CheckpointError otherwise."""
    def bad(what):
        return ckpt.CheckpointError(f"{path} is a damaged switch-dit checkpoint ({what}); use another checkpoint, "
                                    "e.g. an earlier step_XXXXXXX.pt of the run")

    if not isinstance(saved, dict) or saved.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a switch-dit training checkpoint")
    needed = ["config", "model", "ema", "step", "in_channels", "input_size", "num_classes"]
    needed += ["opt", "weighting", "scaler", "rng"] if for_resume else []
    missing = [k for k in needed if k not in saved]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    if not isinstance(saved["config"], dict):
        raise bad(f"its config is a {type(saved['config']).__name__}, not a mapping")
    _config_from_record(saved["config"], path)
    for key in ("model", "ema"):
        w = saved[key]
        if not isinstance(w, dict) or not w or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in w.items()):
            raise bad(f"its {key} entry is not a state dict of tensors")
    step = saved["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"step is {step!r}")
    for key in ("in_channels", "input_size", "num_classes"):
        v = saved[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"{key} is {v!r}")
    typed = {"opt": dict, "weighting": dict, "scaler": dict, "rng": dict, "health": dict}
    for key, typ in typed.items():
        if key in saved and saved[key] is not None and not isinstance(saved[key], typ):
            raise bad(f"its {key} entry is a {type(saved[key]).__name__}")
    opt = saved.get("opt")
    if opt is not None and (not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list)):
        raise bad("its optimizer state has no state/param_groups")
    rng = saved.get("rng")
    if rng is not None and not isinstance(rng.get("torch"), torch.Tensor):
        raise bad("its RNG state has no torch generator state")
    health = saved.get("health") or {}
    if not all(isinstance(k, int) and isinstance(v, (int, float)) for k, v in health.items()):
        raise bad("its health record is not step -> loss")
    names = saved.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad("its class_names are not a list of strings")


def _name_from_tensors(state: dict, path, variant: str) -> str:
    """The model name a state dict's shapes and keys say (DiT for DiT/DTR layouts: DTR has no weights of its own;
    a token-routed mixture needs --model TC-MoE-... or EC-MoE-..., the two have the same weights)."""
    arch = infer_architecture(state, path)
    size = _size_name(arch)
    if size == "?":
        raise ckpt.CheckpointError(f"{path}: depth {arch['depth']} and width {arch['hidden']} are no size this code "
                                   "knows (XS, Ti, S, B, L, XL)")
    if arch["family"] == "TC-MoE/EC-MoE":
        raise ckpt.CheckpointError(f"{path} holds a token-routed model: pass --model TC-MoE-{size}/{arch['patch']} or "
                                   f"EC-MoE-{size}/{arch['patch']} (their weights look alike)")
    family = (arch["family"] if arch["family"] in ("Switch-DiT", "DiffMoE") else variant if variant == "DTR"
              else "DiT")
    return f"{family}-{size}/{arch['patch']}"


def _config_from_record(record, path) -> Config:
    if not isinstance(record, dict):
        raise ckpt.CheckpointError(f"{path}: its config is a {type(record).__name__}, not a mapping; the file is "
                                   "damaged: use another checkpoint")
    try:
        return config_from_dict(_runnable(record)).validate()
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: its recorded config is invalid ({' '.join(str(e).split())}); the file is "
                                   "damaged or of another version") from None


def _int(v, name, path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ckpt.CheckpointError(f"{path}: {name} is {v!r}, not a positive integer; the file is damaged")
    return v


def _agree(model: DiT, record: dict, path, cfg: Config | None = None) -> None:
    """Sizes the file claims beside its tensors must be the tensors' own (and a pixel model's recorded image size
    its input size)."""
    actual = {"in_channels": model.in_channels, "input_size": model.x_embedder.grid_size * model.patch_size,
              "num_classes": model.num_classes}
    wrong = [f"{k} {record.get(k)!r} (the weights say {v})" for k, v in actual.items() if record.get(k) != v]
    if (cfg is not None and model.in_channels in (1, 3) and cfg.data != "latents" and not cfg.vae
            and cfg.image_size != actual["input_size"]):  # (a latent model of other code may record no VAE)
        wrong.append(f"config image_size {cfg.image_size!r} (the weights say {actual['input_size']})")
    if wrong:
        raise ckpt.CheckpointError(f"{path} claims {', '.join(wrong)}; the file is damaged or edited")


def _non_default(cfg: Config) -> set:
    default = Config()
    return {k for k in vars(cfg) if not k.startswith("_") and getattr(cfg, k) != getattr(default, k, None)}


# What a model's user may change at load time: how it samples (and on which device, with which VAE); the rest is
# what the file records.
SAMPLING_FIELDS = ("sampler", "num_sampling_steps", "cfg_scale", "cfg_channels", "ddim_eta", "global_seed", "device",
                   "vae", "noise_schedule")


def _refuse_recorded(cfg: Config, overrides: Config | None, given: set, path) -> None:
    """load(path, top_k=1) on a file that records top_k=2 is a mistake, not a wish: one line naming it."""
    if overrides is None:
        return
    from .config import ARCH_FIELDS  # what shapes the network; --model has its own message

    wrong = [f"{k}={getattr(overrides, k)!r} (the file records {getattr(cfg, k)!r})" for k in sorted(given)
             if (k in ARCH_FIELDS or k == "image_size") and k != "model" and getattr(overrides, k) != getattr(cfg, k)]
    if wrong:
        raise ckpt.CheckpointError(f"{path} records its options; {', '.join(wrong)} cannot change how it was "
                                   f"trained: leave {'them' if len(wrong) > 1 else 'it'} out")


def _override(cfg: Config, overrides: Config | None, given: set, only: tuple | None = None) -> Config:
    """cfg with the explicitly given fields of overrides (only those named in ``only``, if given)."""
    if overrides is None:
        return cfg
    for k in given:
        if (only is None or k in only) and hasattr(cfg, k):
            setattr(cfg, k, getattr(overrides, k))
    return cfg


__all__ = ["load", "save_pretrained", "load_model", "resolve_pretrained", "plain_config", "authors_settings",
           "infer_architecture", "build_checked", "PRETRAINED", "PRETRAINED_DIR"]


# --- hub-style folders and the public load() ------------------------------------------------------------------

FOLDER_FORMAT = "switch-dit/model-folder/1"


def class_names_for(cfg: Config, num_classes: int) -> list[str]:
    """The class names a model was trained with, where the data says them (Fashion-MNIST's, an image folder's
    sub-folders, latents' metadata), else '0', '1', ..."""
    import json

    from .data.datasets import FASHION_MNIST_CLASSES

    if cfg.data == "fashion-mnist" and num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    try:
        if cfg.data == "folder" and cfg.data_path and Path(cfg.data_path).is_dir():
            subdirs = sorted(p.name for p in Path(cfg.data_path).iterdir() if p.is_dir())
            if len(subdirs) == num_classes:
                return subdirs
        if cfg.data == "latents" and cfg.data_path:
            names = json.loads((Path(cfg.data_path) / "meta.json").read_text()).get("class_names")
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
    except (OSError, ValueError):
        pass
    return [str(i) for i in range(num_classes)]


def _attach(model: DiT, cfg: Config, step, names=None, source=None) -> DiT:
    """The loaded model carries what it was loaded with: .config, .step, .class_names, .source."""
    model.config, model.step, model.source = cfg, step, source
    if not (isinstance(names, list) and len(names) == model.num_classes and all(isinstance(n, str) for n in names)):
        names = class_names_for(cfg, model.num_classes)
    model.class_names = names
    return model


def save_pretrained(model: DiT, folder, config: Config | None = None, step: int | None = None,
                    card: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A hub-style model folder, as diffusers and huggingface_hub lay out a repository: config.json (the Config,
    sizes, class names, step), model.safetensors (the weights) and README.md (a model card). ``load(folder)`` and
    ``DiT.from_pretrained(folder)`` read it; nothing in it can run code."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    cfg = config or getattr(model, "config", None)
    if cfg is None:
        raise ValueError("save_pretrained needs the model's Config (config=...): a model made by create_model does "
                         "not know its training options; load() and train() attach one")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained writes a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds other files; save_pretrained writes into an empty folder or over an earlier "
                         "model folder: choose a new one")
    folder.mkdir(parents=True, exist_ok=True)
    step = step if step is not None else getattr(model, "step", None)
    from .flops import active_parameters
    info = {"format": FOLDER_FORMAT, "config": dataclasses.asdict(cfg), "in_channels": model.in_channels,
            "input_size": model.x_embedder.grid_size * model.patch_size, "num_classes": model.num_classes,
            "class_names": getattr(model, "class_names", None) or class_names_for(cfg, model.num_classes),
            "step": step, "parameters": sum(p.numel() for p in model.parameters()),
            "active_parameters": active_parameters(model)}
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in model.state_dict().items()}
    tmp = folder / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FOLDER_FORMAT})
    os.chmod(tmp, 0o666 & ~ckpt._umask())  # safetensors writes 0600
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    card = card or {}
    size = f"{info['input_size']}x{info['input_size']}"
    if step is not None:
        origin = (f"per token) trained with [switch-dit](https://github.com/) on {cfg.data}"
                  f"{f' ({cfg.data_path})' if cfg.data_path else ''} at {size}, objective {cfg.objective}, "
                  f"{step} steps.")
    else:  # another program's weights: what they were trained on is not known here
        origin = (f"per token, {size}) loaded from another program's weights (its training data and steps are not "
                  "recorded).")
    lines = [f"# {cfg.model}", "",
             f"A {cfg.model} ({info['parameters'] / 1e6:.2f}M parameters, {info['active_parameters'] / 1e6:.2f}M active "
             + origin, "",
             "```python", "import switch_dit", f"pipe = switch_dit.Pipeline.from_pretrained({str(folder)!r})",
             "images = pipe(class_labels=[0, 1], generator=__import__('torch').Generator().manual_seed(0))", "```", "",
             f"Classes: {', '.join(info['class_names'][:20])}{' ...' if len(info['class_names']) > 20 else ''}.",
             f"Sampling defaults: {cfg.sampler}, {cfg.num_sampling_steps} steps, guidance {cfg.cfg_scale}."]
    if card.get("train_command"):
        lines += ["", "Trained with:", "", "```bash", card["train_command"], "```"]
    if card.get("scores"):
        lines += ["", "Scores: " + json.dumps(card["scores"])]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder


def _load_folder(folder: Path, use_ema: bool, cfg_overrides: Config | None):
    import json

    from safetensors.torch import load_file

    try:
        info = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{folder} is a folder without config.json; a model folder holds config.json and "
                                   "model.safetensors (Pipeline/model.save_pretrained or 'switch-dit export --format "
                                   "folder' write one)") from None
    except ValueError as e:
        raise ckpt.CheckpointError(f"{folder}/config.json is not valid JSON ({e}); write the folder again") from None
    if not isinstance(info, dict) or info.get("format") != FOLDER_FORMAT:
        raise ckpt.CheckpointError(f"{folder}/config.json is not a switch-dit model folder's (format "
                                   f"{info.get('format') if isinstance(info, dict) else None!r})")
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{folder} has config.json but no model.safetensors; copy the whole folder") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ckpt.CheckpointError(f"{folder}/model.safetensors is not readable ({type(e).__name__}); write the "
                                   "folder again") from None
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    cfg = _config_from_record(info.get("config"), folder)
    given = set(getattr(cfg_overrides, "_given", ()))
    _refuse_model_override(cfg, cfg_overrides, given, folder)
    _refuse_recorded(cfg, cfg_overrides, given, folder)
    model = build_checked(_override(cfg, cfg_overrides, given, SAMPLING_FIELDS), weights, folder,
                          _int(info.get("num_classes"), "num_classes", folder))
    _agree(model, info, folder, cfg)
    return _attach(model.eval(), cfg, info.get("step"), info.get("class_names"), str(folder))


def load(path_or_name, ema: bool = True, **overrides) -> DiT:
    """Load a model in eval mode from any supported source: a shipped model's name ('fashion-mnist'), a hub-style
    folder, a training checkpoint, an exported .safetensors, the authors' checkpoints or a (released) DiT state dict.
    overrides are Config fields a foreign file may lack or that should win (model='DiT-XL/2', image_size=256,
    noise_schedule='cosine'). The model carries .config (its Config), .step, .class_names and .source."""
    import dataclasses

    src = str(path_or_name)
    if src in PRETRAINED:
        src = f"pretrained:{src}"
    over = None
    if overrides:
        fields = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for load(); use Config field names")
        over = overrides_config(overrides)
    if not src.startswith("pretrained:") and Path(src).is_dir():
        return _load_folder(Path(src), ema, over)
    return load_model(src, use_ema=ema, cfg_overrides=over)[0]


def overrides_config(overrides: dict) -> Config:
    """The Config of options given to complete or override a file's (load()'s keywords, evaluate's --model), with
    the names given in ``_given``; a variant spec as ``model`` sets its options, and one also given with another
    value (even the default) is refused."""
    over = Config(**overrides)
    given = set(overrides)
    if isinstance(over.model, str) and ":" in over.model:  # a variant spec, as --model takes
        from .config import parse_spec_options
        opts = parse_spec_options(over.model.partition(":")[2], f"model {over.model!r}",
                                  "e.g. Switch-DiT-S/2:lambda_dp=0")
        for k, v in opts.items():  # given twice, even at a default value: which one is meant is unclear
            if k in overrides and overrides[k] != v:
                raise ValueError(f"model {over.model!r} sets {k}={v} but {k}={overrides[k]} is given too; give it once")
        given |= set(opts)
        over._apply_spec()
    over._given = given
    return over


def _from_pretrained(cls, path_or_name, **kwargs) -> DiT:
    """Any supported model (a folder, a checkpoint, an export, a shipped model's name); see switch_dit.load."""
    return load(path_or_name, **kwargs)


# The hub methods of the model class live with the formats they read and write (the model module stays below the
# loading layer); importing switch_dit attaches them: model.save_pretrained(folder), DiT.from_pretrained(folder).
DiT.save_pretrained = save_pretrained
DiT.from_pretrained = classmethod(_from_pretrained)
