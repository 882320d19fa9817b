"""One set of options shared by train, sample and demo; argparse flags and YAML keys are the field names."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class Config:
    # --- model
    model: str = "Switch-DiT-S/2"
    num_experts: int = 3
    top_k: int = 2
    lambda_dp: float = 1.0
    mask_form: str = "one_plus"
    prior_alpha: float = 4.0
    dtr_alpha: float = 4.0
    dtr_beta: float = 0.8
    moe_experts: int = 8  # TC-MoE / EC-MoE: routed experts per block
    moe_top_k: int = 2  # TC-MoE: experts per token; EC-MoE: mean experts per token (capacity factor)
    moe_shared: int = 1  # always-on shared experts (fine-grained width, as the routed ones)
    moe_capacity_factor: float = 1.25  # TC-MoE in training: slots per expert over the balanced share (0 = dropless)
    moe_aux_alpha: float = 0.01  # TC-MoE: load-balancing loss weight (DiT-MoE); DiffMoE: capacity-predictor loss
    moe_scope: str = "batch"  # EC-MoE: experts choose among the batch's tokens ("batch") or each sample's ("sample")
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    # --- data
    data: str = "fashion-mnist"
    data_path: Optional[str] = None
    image_size: int = 32
    skip_corrupt: bool = False
    vae: Optional[str] = None
    num_workers: int = 0
    # --- diffusion
    objective: str = "ddpm"  # "ddpm" (the paper) or "flow" (linear-interpolant flow matching, velocity target)
    t_sampling: str = "uniform"  # flow matching's training times: "uniform" or "logit-normal" (SD3)
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    loss_weighting: str = "constant"
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    uw_intervals: int = 8
    uw_lr: float = 0.025
    # --- optimisation
    global_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 0.0
    max_steps: int = 400_000
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    mixed_precision: str = "no"
    compile: bool = False
    time_budget: float = 0.0  # seconds of training: a fresh run times its first steps and trains what fits (0 = off)
    # --- run
    results_dir: str = "results"
    global_seed: int = 0
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 3
    sample_every: int = 0
    device: str = "auto"
    resume: Optional[str] = None
    tensorboard: bool = True
    wandb: bool = False
    # --- sampling (training-time grids and the sample command)
    sampler: str = "ddpm"
    num_sampling_steps: int = 250
    cfg_scale: float = 1.5
    cfg_channels: Optional[int] = None
    ddim_eta: float = 0.0

    @classmethod
    def from_run(cls, run: str, **changes) -> "Config":
        """The Config to continue a run with: the options it recorded (RUN/config.yaml; a checkpoint's own record
        for a checkpoint outside its run folder), ``changes`` applied, resuming from its last checkpoint (or that
        file). ``train(Config.from_run("results/x", max_steps=5000))`` does what ``train --results-dir results/x
        --resume auto --max-steps 5000`` does; ``Config(..., resume="auto")`` instead trains with the options given."""
        import argparse
        from pathlib import Path

        unknown = sorted(set(changes) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for Config.from_run; use Config field names")
        folder = Path(run).is_dir()
        ns = argparse.Namespace(resume="auto" if folder else str(run), results_dir=str(run) if folder else None)
        recorded = resumed_run_config(ns) if folder or Path(run).is_file() else None
        if recorded is None:
            raise ValueError(f"{run} is no run: give a run folder written by train (with its config.yaml) or one of "
                             "its checkpoints (RUN/checkpoints/step_N.pt)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in recorded.items() if k in known and k != "resume"}
        if folder:
            values["results_dir"] = str(run)
        elif Path(run).parent.name == "checkpoints":  # RUN/checkpoints/step_N.pt continues in RUN
            values["results_dir"] = str(Path(run).parent.parent)
        elif "results_dir" not in changes:
            raise ValueError(f"{run} lies outside a run's checkpoints/ folder: give results_dir= for the continued run")
        resume = ns.resume
        if folder and "results_dir" in changes and Path(changes["results_dir"]).resolve() != Path(run).resolve():
            from .checkpoint import resolve_resume  # continued elsewhere: from this run's newest checkpoint

            newest = resolve_resume("auto", run)
            if newest is None:
                raise ValueError(f"{run} holds no checkpoint to continue from in {changes['results_dir']}")
            resume = str(newest)
        return cls(**{**values, "resume": resume, **changes})

    def _apply_spec(self) -> None:
        """'NAME:option=value,...' in model sets those options; one also set here to another non-default value is a
        one-line error (as --model with the option's own flag)."""
        spec = self.model
        name, _, opts = spec.partition(":")
        for key, v in parse_spec_options(opts, f"model {spec!r}", "e.g. Switch-DiT-S/2:lambda_dp=0").items():
            if key == "model":
                raise ValueError(f"model {spec!r}: the model is named before the ':'; give options after it")
            _refuse_run_option(key, f"model {spec!r}")
            default, current = next(f.default for f in fields(self) if f.name == key), getattr(self, key)
            if current != default and current != v:
                raise ValueError(f"model {spec!r} sets {key}={v} but {key}={current} is given too; give it once")
            setattr(self, key, v)
        self.model = name

    def validate(self) -> "Config":
        from .models.dit import parse_model_name
        from .diffusion.weighting import WEIGHTINGS

        for f in fields(self):  # types first, so that the comparisons below cannot raise TypeError
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        if ":" in self.model:  # a variant spec, as --model and compare take: Config(model="TC-MoE-S/2:moe_experts=4")
            self._apply_spec()
        variant = parse_model_name(self.model)[0]
        for f in fields(self):  # inf and nan are never meant (an lr of inf trains NaN weights)
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        _check_device(self.device)
        if self.objective == "flow" and self.sampler == "ddpm":  # the default sampler: a flow run samples with Heun
            self.sampler = "heun"
        checks = [
            (self.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
            (self.objective in ("ddpm", "flow"), f"--objective must be ddpm or flow, got {self.objective!r}"),
            (self.t_sampling in ("uniform", "logit-normal"),
             f"--t-sampling must be uniform or logit-normal, got {self.t_sampling!r}"),
            (self.sampler in SAMPLERS.get(self.objective, ()) or self.objective not in SAMPLERS,
             f"--sampler {self.sampler} does not apply to --objective {self.objective}: use one of "
             f"{', '.join(SAMPLERS.get(self.objective, ()))}"),
            (self.objective == "ddpm" or self.loss_weighting == "constant",
             f"--loss-weighting {self.loss_weighting} applies to --objective ddpm; flow matching uses constant"),
            (self.data in ("fashion-mnist", "digits", "folder", "latents"),
             f"--data must be fashion-mnist, digits, folder or latents, got {self.data!r}"),
            (self.data != "digits" or not self.data_path,
             f"--data digits is scikit-learn's built-in set; --data-path {self.data_path} applies to fashion-mnist, "
             "folder and latents: leave it out"),
            (self.noise_schedule in ("linear", "cosine"), f"--noise-schedule must be linear or cosine, got {self.noise_schedule!r}"),
            (self.loss_weighting in WEIGHTINGS, f"--loss-weighting must be one of {sorted(WEIGHTINGS)}, got {self.loss_weighting!r}"),
            (1 <= self.image_size <= MAX_IMAGE_SIZE,
             f"--image-size must be between 1 and {MAX_IMAGE_SIZE} pixels, got {self.image_size}"),
            (str(self.results_dir).strip() != "", "--results-dir must name a folder (an empty name writes into the "
                                                 "current folder)"),
            (self.global_batch_size >= 1, f"--global-batch-size must be >= 1, got {self.global_batch_size}"),
            (self.max_steps >= 1, f"--max-steps must be >= 1 (the step the run trains to), got {self.max_steps}"),
            (-2**31 <= self.global_seed < 2**32, f"--global-seed must be in [-2^31, 2^32), got {self.global_seed} "
             "(per-sample seeds are seed * 1000003 + i, which must fit in 64 bits)"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = off), got {self.max_grad_norm}"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}"),
            (self.ckpt_every >= 1 and self.log_every >= 1, "--ckpt-every and --log-every must be >= 1"),
            (self.sample_every >= 0, f"--sample-every must be >= 0 (0 = off), got {self.sample_every}"),
            (self.time_budget >= 0, f"--time-budget must be >= 0 seconds (0 = off), got {self.time_budget}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.diffusion_steps >= 2, f"--diffusion-steps must be >= 2, got {self.diffusion_steps}"),
            (self.num_sampling_steps >= 1, f"--num-sampling-steps must be >= 1, got {self.num_sampling_steps}"),
            (self.cfg_scale >= 0, f"--cfg-scale must be >= 0 (1 = no guidance), got {self.cfg_scale}"),
            (self.ddim_eta >= 0, f"--ddim-eta must be >= 0, got {self.ddim_eta}"),
            (0.0 <= self.class_dropout_prob < 1.0, f"--class-dropout-prob must be in [0, 1), got {self.class_dropout_prob}"),
            # sampling options are checked now, not at the first sample grid (which would lose the steps since the
            # last checkpoint) nor only when the checkpoint is sampled
            (self.objective != "ddpm" or self.num_sampling_steps <= self.diffusion_steps,
             f"--num-sampling-steps {self.num_sampling_steps} exceeds --diffusion-steps {self.diffusion_steps}: "
             "a DDPM sampler takes at most one step per timestep"),
            (self.cfg_channels is None or self.cfg_channels >= 1,
             f"--cfg-channels must be >= 1 (the first channels guided; leave it out for all), got {self.cfg_channels}"),
        ]
        if self.loss_weighting == "p2":  # 1 / (k + SNR)^gamma: k <= 0 explodes (or flips sign) where SNR -> 0
            checks += [(self.p2_k > 0, f"--p2-k must be > 0, got {self.p2_k}"),
                       (self.p2_gamma >= 0, f"--p2-gamma must be >= 0, got {self.p2_gamma}")]
        if self.loss_weighting == "uw":  # a negative lr would ascend the uncertainty weights' objective
            checks.append((self.uw_lr > 0, f"--uw-lr must be > 0, got {self.uw_lr}"))
        if self.model.startswith("Switch-DiT"):
            checks += [(self.num_experts >= 1, f"--num-experts must be >= 1, got {self.num_experts}"),
                       (1 <= self.top_k <= self.num_experts,
                        f"--top-k={self.top_k} must be between 1 and --num-experts={self.num_experts}"),
                       (self.lambda_dp >= 0, f"--lambda-dp must be >= 0, got {self.lambda_dp}"),
                       (self.prior_alpha > 0, f"--prior-alpha (the prior table's DTR exponent) must be > 0, "
                                              f"got {self.prior_alpha}")]
        if self.model.startswith(("TC-MoE", "EC-MoE", "DiffMoE")):
            checks += [(self.moe_experts >= 1, f"--moe-experts must be >= 1, got {self.moe_experts}"),
                       (1 <= self.moe_top_k <= self.moe_experts,
                        f"--moe-top-k={self.moe_top_k} must be between 1 and --moe-experts={self.moe_experts}"),
                       (self.moe_shared >= 0, f"--moe-shared must be >= 0, got {self.moe_shared}"),
                       (math.isfinite(self.moe_capacity_factor) and self.moe_capacity_factor >= 0,
                        f"--moe-capacity-factor must be a finite number >= 0 (0 = dropless), got {self.moe_capacity_factor}"),
                       (math.isfinite(self.moe_aux_alpha) and self.moe_aux_alpha >= 0,
                        f"--moe-aux-alpha must be a finite number >= 0, got {self.moe_aux_alpha}"),
                       (not self.model.startswith("DiffMoE") or self.moe_aux_alpha > 0,
                        "--moe-aux-alpha must be > 0 for DiffMoE: it trains the capacity predictor that sizes "
                        "sampling"),
                       (self.moe_scope in ("batch", "sample"), f"--moe-scope must be batch or sample, got {self.moe_scope!r}")]
        # an option the chosen routing ignores is a mistake, not a no-op (EC-MoE's capacity is moe_top_k)
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ignored_options(self.model):
            if getattr(self, name) != default[name]:
                hint = ""
                if name == "moe_capacity_factor" and variant in ("EC-MoE", "DiffMoE"):
                    hint = f" ({variant}'s capacity factor, the mean experts per token, is --moe-top-k)"
                elif name == "moe_scope" and variant == "DiffMoE":
                    hint = " (DiffMoE's pool is always the batch)"
                checks.append((False, f"--{name.replace('_', '-')} applies to {OPTION_OWNERS[name]} only; {self.model} "
                                      f"ignores it{hint}: leave it at its default {default[name]!r}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


MAX_IMAGE_SIZE = 4096  # far above any diffusion transformer's resolution; a typo must not allocate terabytes


def _check_device(name: str) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:N', 'mps' (one line for anything else; availability is checked at use)."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name)):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


# The samplers of each objective (the default "ddpm" of a flow run becomes "heun").
SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun", "euler-maruyama")}

# Presets: the paper's ImageNet recipe (method.md section 7) and a CPU recipe for the embedded default data.
PRESETS: dict[str, dict] = {
    "imagenet256": dict(data="latents", image_size=256, global_batch_size=256, lr=1e-4, weight_decay=0.0,
                        max_steps=400_000, ema_decay=0.9999, mixed_precision="bf16", ckpt_every=50_000,
                        log_every=100, noise_schedule="linear", num_sampling_steps=250, cfg_scale=1.5),
    # Fashion-MNIST at 16x16 with 4x4 patches (16 tokens): ~6 steps/s on 2 cores, recognisable classes
    # after 2500 steps (about 7 minutes); 32x32 costs 4x per step and was not recognisable in that time.
    # The 8-minute time budget keeps the demo under 10 minutes on slower or busy machines (fewer steps there).
    "cpu-fashion": dict(model="Switch-DiT-XS/4", data="fashion-mnist", image_size=16, global_batch_size=64,
                        lr=1e-3, warmup_steps=200, max_steps=2500, time_budget=480.0, ema_decay=0.999, ema_warmup=True,
                        ckpt_every=500, log_every=50, sample_every=500, keep_last=2,
                        sampler="ddim", num_sampling_steps=50, cfg_scale=4.0),
}

ARCH_FIELDS = ("model", "objective", "num_experts", "top_k", "mask_form", "dtr_alpha", "dtr_beta",
               "class_dropout_prob", "learn_sigma", "diffusion_steps", "moe_experts", "moe_top_k", "moe_shared",
               "moe_capacity_factor", "moe_aux_alpha", "moe_scope")


def _coerce(f, value):
    """A YAML or dict value as the field's type: numbers written as strings ('1e-3', which YAML reads as a
    string) are accepted, anything else of the wrong type is a one-line error naming the option."""
    typ = _base_type(f)
    if value is None and _is_optional(f):
        return None
    name = f.name.replace("_", "-")
    want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[typ]
    bad = ValueError(f"option {name} must be {want}, got {value!r}")
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                raise bad from None
        raise bad
    if typ == "str":
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value) if not isinstance(value, str) else int(value.strip())
        return float(value)
    except ValueError:
        raise bad from None


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _optional(typ):
    def parse(v):
        return None if v.lower() in ("none", "null", "") else typ(v)
    return parse


# One help line per option (every command shows them); CHOICES for the options with a fixed set of values.
FIELD_HELP = {
    "model": "VARIANT-SIZE/PATCH: VARIANT DiT, DTR, Switch-DiT, TC-MoE, EC-MoE or DiffMoE; SIZE XS, Ti, S, B, L, XL; PATCH 2, 4 "
             "or 8; may carry options as NAME:option=value,... (e.g. Switch-DiT-S/2:lambda_dp=0)",
    "num_experts": "Switch-DiT: experts per block (M)", "top_k": "Switch-DiT: experts each timestep uses (k)",
    "lambda_dp": "Switch-DiT: weight of the diffusion prior loss (0 = gates without the prior)",
    "mask_form": "Switch-DiT: mask 1 + sum_j g_j E_j(z) (one_plus, the authors' code) or the paper's sum_j g_j E_j(z)",
    "prior_alpha": "Switch-DiT: the prior table's DTR alpha", "dtr_alpha": "DTR: window position exponent alpha",
    "dtr_beta": "DTR: fraction of channels active per task", "class_dropout_prob": "label dropout for guidance",
    "moe_experts": "TC-MoE / EC-MoE / DiffMoE: routed experts per block",
    "moe_top_k": "TC-MoE: experts per token; EC-MoE, DiffMoE: mean experts per token (capacity factor)",
    "moe_shared": "TC-MoE / EC-MoE / DiffMoE: always-on shared experts",
    "moe_capacity_factor": "TC-MoE in training: slots per expert over the balanced share (0 = dropless)",
    "moe_aux_alpha": "TC-MoE: load-balancing loss weight; DiffMoE: capacity-predictor loss weight",
    "moe_scope": "EC-MoE: experts choose among the batch's "
    "tokens (batch) or each sample's (sample)",
    "learn_sigma": "predict the variance too (DDPM)", "grad_checkpointing": "recompute activations in backward",
    "data": "training data", "data_path": "its folder (fashion-mnist: the Debian package's by default)",
    "image_size": "image size in pixels", "skip_corrupt": "skip unreadable images instead of stopping",
    "vae": "a local AutoencoderKL folder (latent data; sampling decodes with it)",
    "num_workers": "data loader worker processes", "objective": "ddpm (the paper) or flow (flow matching)",
    "t_sampling": "flow: training times uniform or logit-normal", "noise_schedule": "DDPM beta schedule",
    "diffusion_steps": "DDPM timesteps T", "loss_weighting": "per-timestep loss weighting",
    "min_snr_gamma": "min_snr: gamma", "p2_k": "p2: k", "p2_gamma": "p2: gamma", "uw_intervals": "uw: intervals",
    "uw_lr": "uw: learning rate of the uncertainty weights", "global_batch_size": "batch over all processes",
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay", "warmup_steps": "linear lr warm-up steps",
    "max_grad_norm": "gradient clipping (0 = off)", "max_steps": "training steps", "ema_decay": "EMA decay",
    "ema_warmup": "EMA decay min(decay, (1 + s) / (10 + s))", "mixed_precision": "autocast precision",
    "compile": "torch.compile the training step", "time_budget": "seconds of training: a fresh run times its "
    "first steps and trains what fits (0 = off)", "results_dir": "run folder (checkpoints, logs, config.yaml)",
    "global_seed": "seed of everything random (sampling: per-sample seeds seed * 1000003 + i)",
    "log_every": "steps between log lines", "ckpt_every": "steps between checkpoints",
    "keep_last": "checkpoints kept", "sample_every": "steps between sample grids (0 = off)",
    "device": "auto, cpu, cuda or cuda:N", "resume": "a checkpoint, or auto = the newest in --results-dir (the "
    "run's config.yaml supplies its options)", "tensorboard": "write a TensorBoard log",
    "wandb": "log to wandb (offline)", "sampler": "sampler", "num_sampling_steps": "sampling steps (model calls)",
    "cfg_scale": "classifier-free guidance scale (1 = none)",
    "cfg_channels": "channels guidance applies to (default all; 3 reproduces DiT's sampler)",
    "ddim_eta": "DDIM eta (0 = deterministic)",
}
CHOICES = {"mask_form": ("one_plus", "paper"), "moe_scope": ("batch", "sample"),
           "data": ("fashion-mnist", "digits", "folder", "latents"), "objective": ("ddpm", "flow"),
           "t_sampling": ("uniform", "logit-normal"), "noise_schedule": ("linear", "cosine"),
           "loss_weighting": ("constant", "min_snr", "p2", "uw"), "mixed_precision": ("no", "fp16", "bf16"),
           "sampler": ("ddpm", "ddim", "dpm++", "euler", "heun", "euler-maruyama")}


def add_config_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                         defaults_from: str | None = None) -> None:
    """One flag per Config field (--global-batch-size ...); defaults are SUPPRESSed so that the layering
    defaults < --preset < --config YAML < explicit flags can tell what was given."""
    parser.add_argument("--config", help="YAML file whose keys are these options (dashes or underscores)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe, applied before --config")
    hints = {f.name: f for f in fields(Config)}
    for f in fields(Config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        # sample/analyze/evaluate: a model's own recorded options are the defaults, not Config's
        shown = f"default: {defaults_from}" if defaults_from else f"default {default}"
        choices = f"; one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else ""
        # choices in the help only: a wrong value meets Config.validate's one-line error, not argparse's usage dump
        text = f"{FIELD_HELP.get(f.name, f.name.replace('_', ' '))} ({shown}{choices})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                metavar="BOOL", help=text)
        else:
            base = {"int": int, "float": float, "str": str}[_base_type(hints[f.name])]
            typ = _optional(base) if _is_optional(hints[f.name]) else base
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=text)


def _base_type(f) -> str:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return t.replace("Optional[", "").replace("]", "")


def _is_optional(f) -> bool:
    return isinstance(f.type, str) and f.type.startswith("Optional")


def resumed_run_config(args: argparse.Namespace) -> dict | None:
    """For --resume: the options the run was started with (RESULTS/config.yaml, which every run writes), so that
    'train --results-dir R --resume auto' continues the run without repeating its flags."""
    resume = getattr(args, "resume", None)
    if not resume:
        return None
    from pathlib import Path

    if resume == "auto":
        folder = getattr(args, "results_dir", None)  # the run folder as the layering decides it: flag > YAML > preset
        if folder is None and getattr(args, "config", None):
            folder = load_yaml(args.config).get("results_dir")
        if folder is None and getattr(args, "preset", None):
            folder = PRESETS[args.preset].get("results_dir")
        path = Path(folder or Config.results_dir) / "config.yaml"
        if not path.is_file():  # a run folder that lost its config.yaml: its newest checkpoint records the options
            from .checkpoint import list_checkpoints
            found = list_checkpoints(path.parent / "checkpoints")
            return _recorded_options(found[-1]) if found else None
    else:
        ckpt_path = Path(resume)
        path = ckpt_path.parent.parent / "config.yaml"  # RESULTS/checkpoints/step_X.pt -> RESULTS/config.yaml
        if ckpt_path.parent.name != "checkpoints" or not path.is_file():
            return _recorded_options(ckpt_path)  # a checkpoint outside its run folder: the options it records
    if not path.is_file():
        return None
    saved = load_yaml(str(path))
    saved.pop("results_dir", None)  # the folder the run is resumed in is the one given now
    return _checked_record(saved, path)


def _recorded_options(ckpt_path) -> dict | None:
    """The options a training checkpoint records (None where it is not one: the resume itself says why)."""
    from pathlib import Path

    from .checkpoint import FORMAT, load
    try:
        saved = load(ckpt_path) if Path(ckpt_path).is_file() else None
    except ValueError:
        return None
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT and isinstance(saved.get("config"), dict)):
        return None
    return _checked_record({k: v for k, v in saved["config"].items() if k not in ("results_dir", "resume")}, ckpt_path)


SWITCH_OPTIONS = ("num_experts", "top_k", "lambda_dp", "prior_alpha", "mask_form")  # Switch-DiT's router and prior
DTR_OPTIONS = ("dtr_alpha", "dtr_beta")
MOE_OPTIONS = ("moe_experts", "moe_top_k", "moe_shared", "moe_capacity_factor", "moe_aux_alpha", "moe_scope")
# which variant each option applies to, for the refusal message
OPTION_OWNERS = {**dict.fromkeys(SWITCH_OPTIONS, "Switch-DiT"), **dict.fromkeys(DTR_OPTIONS, "DTR"),
                 **dict.fromkeys(MOE_OPTIONS, "TC-MoE, EC-MoE and DiffMoE"), "moe_capacity_factor": "TC-MoE",
                 "moe_aux_alpha": "TC-MoE and DiffMoE", "moe_scope": "EC-MoE"}


def ignored_options(model) -> tuple:
    """The options a model's routing ignores (refused when given; reset to their defaults in a recorded config)."""
    if not isinstance(model, str):
        return ()
    variant = model.rsplit("-", 1)[0]
    shared = (() if variant == "Switch-DiT" else SWITCH_OPTIONS) + (() if variant == "DTR" else DTR_OPTIONS)
    if variant == "EC-MoE":
        return shared + ("moe_capacity_factor", "moe_aux_alpha")
    if variant == "DiffMoE":
        return shared + ("moe_capacity_factor", "moe_scope")
    if variant == "TC-MoE":
        return shared + ("moe_scope",)
    return shared + MOE_OPTIONS


def drop_ignored(values: dict) -> dict:
    """A recorded config with the options its model ignores at their defaults: runs recorded before such options
    were refused stay loadable and resumable (the options never changed their weights)."""
    defaults = {f.name: f.default for f in fields(Config)}
    values = {**values, **{k: defaults[k] for k in ignored_options(values.get("model")) if k in values}}
    if values.get("data") == "digits" and values.get("data_path"):  # (built in: the path was never read)
        values["data_path"] = None
    return values


def _runnable(values: dict) -> dict:
    """A recorded config with a value earlier versions accepted and this one refuses set to the nearest valid one:
    max_steps 0 (a run that trained nothing) reads as 1; the options given now still override it."""
    return {**values, "max_steps": 1} if values.get("max_steps") == 0 else values


def _checked_record(values: dict, source) -> dict:
    """A run's recorded options, valid, or a one-line error naming the file they come from."""
    values = _runnable(drop_ignored(values))
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown and os.environ.get("RANK", "0") == "0":  # (a field of another version, or a hand edit: not used)
        print(f"[switch-dit] note: {source} records option(s) this version does not know, ignored: "
              f"{', '.join(unknown)}", file=sys.stderr, flush=True)
    try:
        Config(**{k: v for k, v in values.items() if k in known}).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: the run's recorded options are invalid ({' '.join(str(e).split())}); the file "
                         "is damaged or edited: resume from another checkpoint or start a new --results-dir") from None
    return values


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as e:
        raise ValueError(f"config file {path} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}; write one 'option: value' per line") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"config file {path}: {bad[0]!r} is not an option name; write one 'option: value' per line")
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_from_args(args: argparse.Namespace, base: Config | None = None, validate: bool = True,
                     resumed: dict | None = None) -> Config:
    """defaults < --preset < the resumed run's saved config < --config YAML < explicit flags."""
    values = dataclasses.asdict(base or Config())
    if getattr(args, "preset", None):
        values.update(PRESETS[args.preset])
    if resumed:
        known = {f.name for f in fields(Config)}
        values.update({k: v for k, v in resumed.items() if k in known and k not in ("resume",)})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    known = {f.name for f in fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in known}
    values.update(given)
    if isinstance(values.get("model"), str) and ":" in values["model"]:  # a variant spec: NAME:option=value,...
        values, given = _apply_model_spec(values, given)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; see --help for the list")
    cfg = Config(**values)
    cfg._given = set(given)  # the flags given explicitly: a foreign checkpoint's recorded settings yield to them
    return cfg.validate() if validate else cfg


def apply_sampling_options(cfg: Config, args: argparse.Namespace,
                           keys=("sampler", "num_sampling_steps", "cfg_scale", "cfg_channels", "ddim_eta",
                                 "global_seed", "device", "vae", "noise_schedule")) -> Config:
    """Sampling options given on the command line win over a checkpoint's; checked against its objective."""
    for k in keys:
        v = getattr(args, k, None)
        if v is not None:
            setattr(cfg, k, v)
    if getattr(args, "sampler", None) and args.sampler not in SAMPLERS[cfg.objective]:
        raise ValueError(f"--sampler {args.sampler} does not apply to this {cfg.objective} model: use one of "
                         f"{', '.join(SAMPLERS[cfg.objective])}")
    return cfg.validate()


def parse_spec_options(opts: str, where: str, hint: str) -> dict:
    """The options of a variant spec, 'lambda_dp=0,top-k=1' -> {Config field: typed value}, in order; an unknown
    name, a missing '=', an unreadable value or an option given twice is a one-line error that starts with
    ``where`` and ends with ``hint`` (an example)."""
    by_name = {f.name: f for f in fields(Config)}
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in by_name:
            raise ValueError(f"{where}: {item!r} is not option=value with a known option ({hint})")
        if key in options:
            raise ValueError(f"{where}: {key} is given twice; give it once")
        options[key] = _coerce(by_name[key], value.strip())
    return options


def _refuse_run_option(key: str, where: str) -> None:
    """Where and how a run goes is not an option of the model a spec names."""
    if key in ("results_dir", "resume", "device", "config", "preset"):
        raise ValueError(f"{where}: {key} is not an option of the model; give it as --{key.replace('_', '-')}")


def _apply_model_spec(values: dict, given: dict) -> tuple[dict, dict]:
    """'--model Switch-DiT-S/2:lambda_dp=0' sets lambda_dp as the comparison's variant specs do; an option also
    given as its own flag with another value is a one-line error."""
    name, _, opts = values["model"].partition(":")
    values = {**values, "model": name}
    given = {**given, "model": name} if "model" in given else given
    where = f"--model {name}:{opts}"
    for key, v in parse_spec_options(opts, where, "e.g. --model Switch-DiT-S/2:lambda_dp=0").items():
        if key == "model":
            raise ValueError(f"{where}: the model is named before the ':'; give options after it")
        _refuse_run_option(key, where)
        if key in given and given[key] != v:
            raise ValueError(f"--model sets {key}={v} but --{key.replace('_', '-')} {given[key]} is given too; "
                             "give it once")
        values[key] = v
        given[key] = v
    return values, given


def config_from_dict(d: dict) -> Config:
    """A recorded config (a checkpoint's, an export's) as a Config; options its model ignores reset to defaults."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in drop_ignored(d).items() if k in known})


__all__ = ["Config", "PRESETS", "ARCH_FIELDS", "SAMPLERS", "add_config_arguments", "config_from_args",
           "resumed_run_config",
           "apply_sampling_options", "config_from_dict",
           "load_yaml", "field"]
