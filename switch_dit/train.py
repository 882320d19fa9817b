"""One readable training loop: DDP (torchrun), mixed precision, EMA, exact resume, atomic checkpoints, logging.

Every random choice of a step (data order, flips, timesteps, noise, label drop) is drawn for the whole
global batch from a generator seeded by (global seed, step), and each process takes its slice. So a run
on P processes equals a run on one with the same global batch, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import ARCH_FIELDS, Config, drop_ignored
from .data import build_dataset
from .diffusion import create_diffusion
from .flow import FlowMatching
from .factory import build_model, build_weighting
from .integrations import RunLogger
from .models.dit import DiT, parse_model_name
from .models.moe import calibrate_thresholds
from .utils import dist as du


class TrainingDiverged(RuntimeError):
    pass


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 97 + stream) % (2**63 - 1))


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch, seeded by (seed, epoch); cached so each step does not redraw it."""
    return torch.randperm(num_items, generator=step_generator(seed, epoch, stream=1))


def global_batch_indices(num_items: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch of a step: epoch e is a permutation seeded by (seed, e), without replacement."""
    epoch, i = divmod(step, num_items // global_batch)
    return epoch_permutation(num_items, seed, epoch)[i * global_batch: (i + 1) * global_batch].clone()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):  # state the model learns outside its weights (DiffMoE's
        e.copy_(b)  # thresholds) follows the model until calibrate_thresholds fits it to the EMA's own predictor


def ema_decay_at(cfg: Config, step: int) -> float:
    """With ema_warmup, min(decay, (1 + s) / (10 + s)) so short runs are not dominated by the initial weights."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def lr_at(cfg: Config, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr


def _check_results_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"results dir {path} is not writable ({e.strerror}); choose another --results-dir") from None


def check_compatible(saved: dict, cfg: Config, path) -> None:
    """A checkpoint of another model or architecture config gives a clear error naming the differences."""
    if saved.get("format") != ckpt.FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a switch-dit training checkpoint (format {saved.get('format')!r})")
    diffs = [f"{k}: checkpoint {a!r} vs now {b!r}"
             for k, a, b in config_differences(saved["config"], cfg, ARCH_FIELDS + ("image_size", "data"))]
    if diffs:
        raise ckpt.CheckpointError(f"checkpoint {path} belongs to another model/config ({'; '.join(diffs)}); "
                                   "use matching options or another --results-dir")


def config_differences(recorded: dict, cfg: Config, keys) -> list[tuple]:
    """(name, recorded value, value now) for each of ``keys`` where a recorded config and cfg differ; fields newer
    than the record count with their default, options its model ignores with theirs (drop_ignored)."""
    old, defaults = drop_ignored(recorded), Config()
    return [(k, old.get(k, getattr(defaults, k)), getattr(cfg, k)) for k in keys
            if old.get(k, getattr(defaults, k)) != getattr(cfg, k)]


def resumed_changes(recorded: dict, cfg: Config) -> list[str]:
    """'name: checkpoint X, now Y' for each option a resume changes (where the run's folder and the resume itself
    are not options of the run)."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in ("results_dir", "resume")]
    return [f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in config_differences(recorded, cfg, keys)]


def rng_state() -> dict:
    """Global RNG states as tensors and plain numbers, so that checkpoints load with the weights-only unpickler."""
    import random
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, pygauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": {"version": version, "state": torch.tensor(pystate, dtype=torch.int64),
                        "gauss": pygauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random
    torch.set_rng_state(state["torch"])
    npy, py = state["numpy"], state["python"]
    if isinstance(npy, dict):
        np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["gauss"]))
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    else:  # checkpoints of earlier versions: numpy's and Python's own tuples
        np.random.set_state(npy)
        random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepBatches(torch.utils.data.Sampler):
    """This process's slice of each step's global batch, for steps [start, end): a DataLoader batch sampler."""

    def __init__(self, num_items: int, global_batch: int, seed: int, start: int, end: int, sl: slice):
        self.args = (num_items, global_batch, seed)
        self.start, self.end, self.sl = start, end, sl

    def __len__(self):
        return max(0, self.end - self.start)

    def __iter__(self):
        for step in range(self.start, self.end):
            yield global_batch_indices(*self.args, step)[self.sl].tolist()


def preflight(cfg: Config) -> Config:
    """Every check of a training config that needs neither data nor a process group: the options, the VAE folder,
    the device, the wandb package. train runs it first; compare runs it for every variant before the first trains."""
    import importlib.util

    cfg.validate()
    if cfg.vae and not (Path(cfg.vae) / "config.json").is_file():  # found now, not when the first grid is drawn
        raise ValueError(f"--vae {cfg.vae}: no AutoencoderKL folder there (config.json + "
                         "diffusion_pytorch_model.safetensors); give the local VAE folder")
    device = du.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))  # (this process's GPU)
    if cfg.data != "latents":  # the model's own checks (latents: its input size is the data set's, read later)
        with torch.device("meta"):
            probe = build_model(cfg, 1, cfg.image_size, 1)
        variant, _, patch = parse_model_name(cfg.model)
        tokens = (cfg.image_size // patch) ** 2
        if variant == "EC-MoE" and cfg.moe_scope == "sample" and cfg.moe_top_k * tokens % cfg.moe_experts:
            # C = moe_top_k * tokens / E rounded would give each token another number of experts on average than
            # moe_top_k, and every reported cost (active parameters, FLOPs) would be wrong. (Refused for training
            # only: a model trained so before this check still loads.)
            fits = [k for k in range(1, cfg.moe_experts + 1) if k * tokens % cfg.moe_experts == 0]
            raise ValueError(f"EC-MoE with moe_scope=sample: each expert would take moe_top_k x tokens per sample / "
                             f"moe_experts = {cfg.moe_top_k} x {tokens} / {cfg.moe_experts} tokens, not a whole "
                             f"number; use moe_top_k in {fits}, another moe_experts, or moe_scope=batch")
    else:  # the parameters do not depend on the input size (the position embedding is a buffer)
        try:
            with torch.device("meta"):
                probe = build_model(cfg, 4, parse_model_name(cfg.model)[2], 1)
        except (ValueError, RuntimeError):  # (the build with the data set's sizes says what is wrong, later)
            probe = None
    if probe is not None:
        _check_fits_memory(cfg, sum(p.numel() for p in probe.parameters()), device)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs the wandb package: pip install 'switch-dit[wandb]'")
    return cfg


def _check_fits_memory(cfg: Config, num_params: int, device: torch.device) -> None:
    """A model whose weights, EMA, gradients and AdamW moments (5 float32 copies) exceed the device's whole memory
    is a one-line error now, not an out-of-memory kill after minutes (e.g. a typo in --moe-experts)."""
    need = 5 * 4 * num_params
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        elif device.type == "cpu":
            page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
            total = page * pages if page > 0 and pages > 0 else 0
        else:
            return
    except (ValueError, OSError, AttributeError, AssertionError, RuntimeError):  # nothing to compare with here
        return
    if total > 0 and need > total:  # (sysconf says -1 where it cannot tell)
        raise ValueError(f"{cfg.model} with these options has {num_params / 1e6:,.0f}M parameters: its weights, EMA, "
                         f"gradients and AdamW state need {need / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} "
                         f"GiB of {device.type}; choose a smaller model or fewer experts (--moe-experts, --num-experts)")


def train(cfg: Config, progress: bool = True) -> dict:
    """Train according to cfg; returns a summary (final step, last losses, paths)."""
    preflight(cfg)
    if cfg.vae:
        cfg.vae = str(Path(cfg.vae).resolve())  # recorded absolute: sampling from another folder finds it
    info = du.setup(cfg.device)
    lock = ckpt.RunLock(cfg.results_dir)
    created, finished = not Path(cfg.results_dir).exists(), False
    try:
        if info.is_main:
            _check_results_dir(Path(cfg.results_dir))
            lock.acquire()  # one run per results folder
            earlier = ckpt.list_checkpoints(Path(cfg.results_dir) / "checkpoints")
            if earlier and not cfg.resume:  # a fresh run would overwrite its config and log and mix checkpoints
                raise ValueError(f"results dir {cfg.results_dir} already holds a run (checkpoints up to "
                                 f"{earlier[-1].name}): continue it with --resume auto, or choose a new --results-dir")
            ckpt.remove_stale_temp_files(Path(cfg.results_dir) / "checkpoints")  # left by a save killed midway
        summary = _train(cfg, info, progress)
        finished = True
        return summary
    finally:
        lock.release()
        if created and not finished and info.is_main:  # a run that failed before writing anything leaves no folder
            _remove_if_only_guard(Path(cfg.results_dir))
        du.teardown()


def _remove_if_only_guard(folder: Path) -> None:
    """Remove a results folder this run created if the run lock's guard file is all it holds."""
    try:
        if {p.name for p in folder.iterdir()} <= {".lock.guard"}:
            (folder / ".lock.guard").unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # (someone else's file appeared meanwhile: keep the folder)
        pass


class LossWatch:
    """The divergence check without a host sync of its own. Each step's loss is copied to pinned host memory
    without blocking and read one step later, once the next step's forward and backward are queued (for
    Switch-DiT the matching has synchronised by then anyway), and before every checkpoint save, so the one
    update taken from a non-finite loss is never saved."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.float32, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending: tuple[int, int | None] | None = None  # (step, checkpoint step its weights measure)

    def push(self, step: int, loss: torch.Tensor, measures: int | None) -> None:
        self.host.copy_(loss.detach().float(), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()
        self.pending = (step, measures)

    def read(self) -> tuple[int, float, int | None] | None:
        if self.pending is None:
            return None
        if self.event is not None:
            self.event.synchronize()  # already complete when the matching synchronised after the copy
        (step, measures), self.pending = self.pending, None
        return step, float(self.host), measures


def divergence_message(loss: float, step: int, cfg: Config, ckpt_dir: Path, health: dict[int, float],
                       best: float | None = None) -> str:
    """Advice that works: the newest checkpoint whose weights still trained well (judged against the run's best
    smoothed loss too, not only the other checkpoints), and the exact flags; or, if none, a fresh start."""
    files = {int(p.stem.split("_")[1]): p for p in ckpt.list_checkpoints(ckpt_dir)}
    good = ckpt.last_good_step({s: v for s, v in health.items() if s in files}, best=best)
    head = f"loss became {loss} at step {step}; nothing trained from it was saved."
    lr = min(cfg.lr / 10, 1e-4)  # a tenth, and never above the paper's 1e-4
    if good is not None:
        return (f"{head} The newest checkpoint that trained well is {files[good]} (loss {health[good]:.4g} with its "
                f"weights); resume from it with a smaller learning rate: --resume {files[good]} --lr {lr:g} "
                "(or add --max-grad-norm 1)")
    newest = ""
    if files:
        h = health.get(max(files))
        newest = (f" (the newest, {files[max(files)]}, was saved after the loss had grown to {h:.3g}, against the "
                  f"run's best {best:.3g})" if h is not None and math.isfinite(h) and best is not None
                  and math.isfinite(best) else
                  f" (the loss was not finite with the weights of the newest, {files[max(files)]}: check the data "
                  "for NaN/inf values)")
    return (f"{head} No checkpoint of this run is known to train well{newest}; start again in a new --results-dir "
            f"with a smaller learning rate, e.g. --lr {lr:g}")


def _train(cfg: Config, info: du.DistInfo, progress: bool) -> dict:
    device = info.device
    if device.type == "cuda":  # TF32 matmuls and convolutions, as DiT's train.py: free speed on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = Path(cfg.results_dir)
    du.barrier()
    if cfg.global_batch_size % info.world_size:
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not divisible by the {info.world_size} processes")
    local_batch = cfg.global_batch_size // info.world_size

    dataset = build_dataset(cfg.data, cfg.data_path, cfg.image_size, cfg.skip_corrupt)
    if len(dataset) < cfg.global_batch_size:
        raise ValueError(f"the data set has {len(dataset)} items, fewer than --global-batch-size {cfg.global_batch_size}")
    C, H, W = dataset.shape
    if dataset.num_classes == 1:  # unconditional: no label dropout, no null class, no guidance (recorded)
        cfg.class_dropout_prob, cfg.cfg_scale = 0.0, 1.0
    if cfg.data == "latents" and not cfg.vae:
        cfg.vae = dataset.meta["vae"]  # recorded so that sampling can decode
    torch.manual_seed(cfg.global_seed)  # the same initial weights on every process and every run
    model = build_model(cfg, C, H, dataset.num_classes).to(device)
    if cfg.cfg_channels is not None and cfg.cfg_channels > model.in_channels:  # (found now, not at the first grid)
        raise ValueError(f"--cfg-channels {cfg.cfg_channels} exceeds the data's {model.in_channels} channels")
    # what switch_dit.load attaches, so that the trained model (and its EMA) can save_pretrained / sample by name
    model.config, model.step, model.source = cfg, None, str(results)
    model.class_names = list(getattr(dataset, "class_names", None) or map(str, range(dataset.num_classes)))
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)  # EMA kept in fp32
    # The generative process: DDPM (the paper) or flow matching (--objective flow); both give training_losses.
    diffusion = FlowMatching(cfg.t_sampling) if cfg.objective == "flow" else create_diffusion(
        noise_schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma, diffusion_steps=cfg.diffusion_steps)
    weighting = build_weighting(cfg).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
    if list(weighting.parameters()):
        groups.append({"params": list(weighting.parameters()), "lr": cfg.uw_lr, "weight_decay": 0.0,
                       "base_lr": cfg.uw_lr})
    # fused AdamW on CUDA: one kernel for all parameters instead of a loop of small ones
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)
    amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    start_step = 0
    carried = None  # the log interval a checkpoint was saved in: its loss sums and routing counters so far
    health: dict[int, float] = {}  # checkpoint step -> the loss measured with its weights (the next step's)
    trace = {"smoothed": None, "best": math.inf, "reads": 0}  # the run's smoothed loss and its best, for the advice
    resume_path = ckpt.resolve_resume(cfg.resume, results)
    if resume_path is None and cfg.resume == "auto" and info.is_main:
        print(f"[switch-dit] --resume auto: no checkpoint in {results / 'checkpoints'}; starting a new run", flush=True)
    if resume_path is not None:
        from .loading import build_checked, check_training_state

        try:
            saved = ckpt.load(resume_path)
        except ckpt.CorruptCheckpointError as e:  # name the checkpoint to continue from instead, if there is one
            earlier = ckpt.newest_readable(ckpt.list_checkpoints(results / "checkpoints")[:-1]) \
                if cfg.resume == "auto" else None
            if earlier is None:
                raise
            raise ckpt.CheckpointError(f"{e.problem}; the newest readable checkpoint is "
                                       f"{earlier}: resume from it with --resume {earlier}, or delete the damaged "
                                       "file and use --resume auto") from None
        if not isinstance(saved, dict) or saved.get("format") != ckpt.FORMAT:
            raise ckpt.CheckpointError(f"{resume_path} is not a switch-dit training checkpoint; --resume takes a "
                                       "step_XXXXXXX.pt of a run (or auto)")
        check_training_state(saved, resume_path, for_resume=True)
        check_compatible(saved, cfg, resume_path)
        changed = resumed_changes(saved["config"], cfg)
        if changed and info.is_main:  # (train(Config(...)) resumes with the Config's values, defaults included)
            print(f"[switch-dit] resuming with options other than the checkpoint's: {'; '.join(changed)}", flush=True)
        for key in ("model", "ema"):  # keys, shapes and finiteness, checked on 'meta' before anything is loaded
            build_checked(copy.deepcopy(cfg), saved[key], f"{resume_path} ({key})", model.num_classes, check_only=True)
        claims = {"in_channels": model.in_channels, "input_size": model.x_embedder.grid_size * model.patch_size,
                  "num_classes": model.num_classes}
        wrong = [f"{k} {saved[k]!r} (this run: {v})" for k, v in claims.items() if saved[k] != v]
        if wrong:
            raise ckpt.CheckpointError(f"{resume_path} claims {', '.join(wrong)}: it is damaged or of another run; "
                                       "resume from an earlier checkpoint or use another --results-dir")
        health = {int(k): float(v) for k, v in (saved.get("health") or {}).items()}
        trace.update(saved.get("loss_trace") or {})
        carried = _carried_interval(saved.get("log_interval"), cfg, saved["step"], counters=bool(model.mixtures))
        was = saved["config"].get("loss_weighting", "constant")
        if "uw" in (was, cfg.loss_weighting) and was != cfg.loss_weighting:  # every checkpoint of the run has this
            raise ValueError(f"--loss-weighting {cfg.loss_weighting}: the run at {resume_path} trained with {was}, and "
                             "UW's learned weights are part of the optimiser state; resume with --loss-weighting "
                             f"{was}, or start a new run in another --results-dir")
        try:
            model.load_state_dict(saved["model"])
            ema.load_state_dict(saved["ema"])
            opt.load_state_dict(saved["opt"])
            weighting.load_state_dict(saved["weighting"])
            scaler.load_state_dict(saved["scaler"])
            if model.prior is not None:
                model.prior.set_rng_state(saved["prior_rng"])
            set_rng_state(saved["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise ckpt.CheckpointError(f"{resume_path} cannot be resumed: its training state does not fit this run "
                                       f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); resume from an "
                                       "earlier checkpoint (--resume PATH)") from None
        # The learning rates and weight decay are this run's options, not the checkpoint's (--resume ... --lr X).
        for group, fresh in zip(opt.param_groups, groups):
            group["base_lr"], group["weight_decay"] = fresh["base_lr"], fresh["weight_decay"]
        start_step = saved["step"]
        del saved

    train_model = model
    if info.distributed:
        # No buffer sync before each forward: the buffers are constants, each process's own routing counters (summed
        # over processes when logged) and DiffMoE thresholds, which their all-reduced quantiles keep equal everywhere
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})  # (the older name, which newer torch deprecates)
        train_model = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    if cfg.compile:
        train_model = torch.compile(train_model)

    logger = RunLogger(str(results), cfg.tensorboard, cfg.wandb, dataclasses.asdict(cfg), enabled=info.is_main,
                       start_step=start_step)
    if info.is_main:
        if start_step < cfg.max_steps:  # (a run past --max-steps keeps its record: it trains nothing)
            (results / "config.yaml").write_text(_to_yaml(dataclasses.asdict(cfg)))
        from .flops import active_parameters
        total, active = sum(p.numel() for p in model.parameters()), active_parameters(model)
        print(f"[switch-dit] {cfg.model}: {total / 1e6:.2f}M parameters"
              + (f" ({active / 1e6:.2f}M active per token)" if active != total else "") +
              f", {len(dataset)} training items of shape {dataset.shape}, {info.world_size} process(es) on {device}, "
              f"steps {start_step} -> {cfg.max_steps}", flush=True)
        if start_step >= cfg.max_steps:  # (--max-steps counts from the run's start, not from the checkpoint)
            print(f"[switch-dit] note: the run is at step {start_step}, "
                  + ("which is --max-steps: it is complete" if start_step == cfg.max_steps else
                     f"past --max-steps {cfg.max_steps} (the step a run trains to, not a number of further steps)")
                  + f"; nothing to train. Give --max-steps above {start_step} to continue it", flush=True)
        if cfg.warmup_steps > cfg.max_steps > start_step:  # (a short run of a recipe with a long warm-up)
            print(f"[switch-dit] note: the {cfg.warmup_steps}-step lr warm-up outlasts the run's {cfg.max_steps} steps: "
                  f"the lr ends at {cfg.lr * cfg.max_steps / cfg.warmup_steps:.3g}, not --lr {cfg.lr:g}", flush=True)
        if dataset.num_classes > 1:  # the label each class trains under, as --class-labels and grids name them
            names = model.class_names
            print("[switch-dit] classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(names[:20]))
                  + (f", ... ({len(names)} in all)" if len(names) > 20 else ""), flush=True)

    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start_step, dynamic_ncols=True, desc="train")
    sl = slice(info.rank * local_batch, (info.rank + 1) * local_batch)
    # Worker processes (--num-workers) load image folders ahead; the order is still fixed by (seed, step).
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), cfg.global_batch_size, cfg.global_seed, start_step,
                                           cfg.max_steps, sl),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda"))
    model.train()
    history: list[dict] = []
    t_last, steps_since, timed = time.time(), 0, 0
    # Losses summed on the device over the log interval (no host sync per step); logged as interval means.
    interval_sums = torch.zeros(4, device=device)
    if carried is not None:  # resumed inside a log interval: it goes on from where the checkpoint left it
        interval_sums += carried["sums"].to(device)
        steps_since = carried["steps"]
        if model.mixtures and info.is_main:  # (the counters are summed over processes when logged)
            model.mixtures[0].stats += carried["routing"].to(device)
    last_saved = resume_path
    step = start_step
    probe = start_step if resume_path is not None else None  # the checkpoint whose weights this step's loss measures
    # --time-budget: time the first steps of a fresh run, then choose the step count that fits (all ranks agree,
    # since rank 0's choice is broadcast)
    budget = {"t0": None} if cfg.time_budget > 0 and start_step == 0 else None
    watch = LossWatch(device)

    def check_loss(read: tuple[int, float, int | None] | None) -> None:
        if read is None:
            return
        at, value, measures = read
        if measures is not None:
            health[measures] = value
        if not math.isfinite(value):
            raise TrainingDiverged(divergence_message(value, at, cfg, results / "checkpoints", health, trace["best"]))
        sm = trace["smoothed"]
        trace["smoothed"] = value if sm is None else 0.9 * sm + 0.1 * value
        trace["reads"] += 1
        if trace["reads"] >= 20:  # past the first steps' transient
            trace["best"] = min(trace["best"], trace["smoothed"])

    try:
        while step < cfg.max_steps:
            x, y = next(loader)
            g = step_generator(cfg.global_seed, step)
            B = cfg.global_batch_size
            flips = torch.rand(B, generator=g)[sl] < 0.5
            if cfg.objective == "flow":
                t = diffusion.sample_t(B, generator=g)[sl]
            else:
                t = weighting.sample_timesteps(B, diffusion.num_timesteps, "cpu", generator=g)[sl]
            noise = torch.randn((B, C, H, W), generator=g)[sl]
            drop = (torch.rand(B, generator=g)[sl] < cfg.class_dropout_prob).long()
            if cfg.data == "latents":  # both flips are cached; a fresh latent sample each time
                x = dataset.draw(x, flips, torch.randn((B, C, H, W), generator=g)[sl])
            else:
                x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            if device.type == "cuda":  # pinned host memory makes the copies below truly asynchronous
                t, noise, drop = t.pin_memory(), noise.pin_memory(), drop.pin_memory()
            x, y, t, noise, drop = (v.to(device, non_blocking=True) for v in (x, y, t, noise, drop))
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr / cfg.lr
            kwargs = dict(y=y, force_drop_ids=drop)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                if model.prior is not None and model.lambda_dp > 0:
                    # host work (the Hungarian matching) stays out of the compiled forward: one sync per step
                    kwargs["prior_target"] = model.matched_prior_table()
                terms = diffusion.training_losses(train_model, x, t, kwargs, noise=noise, weighting=weighting)
            loss = terms["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # the previous step's loss, read now that this step's work is queued (no sync of its own)
            check_loss(watch.read())
            watch.push(step, loss, probe)
            probe = None
            if cfg.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, ema_decay_at(cfg, step))
            interval_sums += torch.stack([loss.detach().float(), terms["mse"].detach().float().mean(),
                                          terms["vb"].detach().float().mean(), terms["aux"].detach().float()])
            step += 1
            steps_since += 1
            timed += 1
            if budget is not None:
                budget = _apply_time_budget(cfg, budget, step, results, bar, info)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                means = (_mean_over_ranks(interval_sums) / steps_since).tolist()
                interval_sums.zero_()
                # the aux term: the diffusion prior's (Switch-DiT), the load-balancing loss (TC-MoE) or the capacity
                # predictor's (DiffMoE); the other variants have none to log
                aux_name = "prior_loss" if model.switch_routers else None
                if any(getattr(m, "aux_alpha", 0) > 0 for m in model.mixtures):
                    aux_name = "predictor_loss" if hasattr(model.mixtures[0], "predictor") else "balance_loss"
                vals = dict(zip(("loss", "mse", "vb", aux_name) if aux_name else ("loss", "mse", "vb"), means))
                if model.mixtures:  # every process's routing counters over the interval (one host read per log)
                    tokens, computed, dropped, unrouted = routing_counters(model).tolist()
                    vals["moe_dropped_slots"] = dropped / max(computed + dropped, 1.0)
                    vals["moe_tokens_without_routed_expert"] = unrouted / max(tokens, 1.0)
                now = time.time()
                vals["steps_per_sec"] = timed / max(now - t_last, 1e-9)
                vals["lr"] = lr
                vals.update(weighting.log_values())
                t_last, steps_since, timed = now, 0, 0
                history.append({"step": step, **vals})
                if info.is_main:
                    logger.scalars({f"train/{k}": v for k, v in vals.items()}, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{vals['loss']:.4f}", aux=f"{means[3]:.4f}",
                                        it_s=f"{vals['steps_per_sec']:.2f}")
            if bar is not None:
                bar.update(1)
            sampling = bool(cfg.sample_every) and (step % cfg.sample_every == 0 or step == cfg.max_steps)
            if sampling or step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                # DiffMoE: the EMA model's thresholds set for its own predictor, on this step's batch (every process)
                plain = {k: v for k, v in kwargs.items() if k != "prior_target"}
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    calibrate_thresholds(ema, lambda m: diffusion.training_losses(m, x, t, plain, noise=noise))
            if info.is_main and sampling:
                _log_samples(ema, diffusion, cfg, dataset, logger, step, device)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                check_loss(watch.read())  # no checkpoint holds weights updated from a non-finite loss
                # never save NaN/inf weights; every rank checks its own (equal) copy, so all stop together
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    raise TrainingDiverged(divergence_message(float("nan"), step, cfg, results / "checkpoints",
                                                              health, trace["best"]))
                interval = {"sums": _mean_over_ranks(interval_sums).cpu(), "steps": steps_since,  # (every process)
                            "routing": routing_counters(model, reset=False) if model.mixtures else None}
                if info.is_main:
                    last_saved = save_training_state(results, step, cfg, model, ema, opt, weighting, scaler, health,
                                                     getattr(dataset, "class_names", None), trace, interval)
                probe = step
                du.barrier()
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    model.step = ema.step = step
    return {"step": step, "history": history, "checkpoint": str(last_saved) if last_saved else None,
            "results_dir": str(results), "model": model, "ema": ema, "diffusion": diffusion, "dataset": dataset}


BUDGET_PROBE = (5, 25)  # steps timed for --time-budget (the first few are slower: allocation, warm-up)


def _apply_time_budget(cfg: Config, budget: dict, step: int, results: Path, bar, info) -> dict | None:
    """At step BUDGET_PROBE[0] start a clock; at BUDGET_PROBE[1] set max_steps to what fits in the budget."""
    first, last = BUDGET_PROBE
    if step == first:
        budget["t0"] = time.time()
        return budget
    if step < last or budget["t0"] is None:
        return budget
    rate = (last - first) / max(time.time() - budget["t0"], 1e-9)
    fits = max(last, int(rate * cfg.time_budget))
    chosen = torch.tensor(min(cfg.max_steps, fits))
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(chosen, 0)
    old, cfg.max_steps = cfg.max_steps, int(chosen)
    if info.is_main:
        print(f"[switch-dit] time budget {cfg.time_budget:g} s: {rate:.2f} steps/s over steps {first}-{last}, "
              f"so training for {cfg.max_steps} steps (--max-steps {old}); recorded in the run's config",
              flush=True)
        (results / "config.yaml").write_text(_to_yaml(dataclasses.asdict(cfg)))
        if bar is not None:
            bar.total = cfg.max_steps
            bar.refresh()
    return None


def save_training_state(results: Path, step: int, cfg: Config, model: DiT, ema: DiT, opt, weighting, scaler,
                        health: dict[int, float] | None = None, class_names=None, trace: dict | None = None,
                        interval: dict | None = None) -> Path:
    state = {
        "format": ckpt.FORMAT,
        "step": step,
        "config": dataclasses.asdict(cfg),
        "model_name": cfg.model,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "weighting": weighting.state_dict(),
        "scaler": scaler.state_dict(),
        "prior_rng": model.prior.rng_state() if model.prior is not None else None,
        "rng": rng_state(),
        "in_channels": model.in_channels,
        "input_size": model.x_embedder.grid_size * model.patch_size,
        "num_classes": model.num_classes,
        "class_names": list(class_names) if class_names else None,
        "health": {int(k): float(v) for k, v in (health or {}).items()},
        "loss_trace": dict(trace) if trace else None,  # smoothed training loss at this save and the run's best
        "log_interval": interval,  # the open log interval (loss sums, steps, routing counters): a resume logs it whole
    }
    path = ckpt.atomic_save(state, ckpt.checkpoint_path(results / "checkpoints", step))
    good = ckpt.last_good_step(health or {}, best=(trace or {}).get("best"))
    ckpt.prune(results / "checkpoints", cfg.keep_last, keep={good} if good is not None else None)
    return path


def _carried_interval(entry, cfg: Config, step, counters: bool = False) -> dict | None:
    """A checkpoint's open log interval, if it is whole (with its routing counters where ``counters``: a model
    with mixtures) and fits this run's --log-every; else None, and the next log covers the steps since the resume,
    as for checkpoints written before the interval was saved."""
    def vector(v):
        return isinstance(v, torch.Tensor) and v.shape == (4,) and v.is_floating_point() and bool(torch.isfinite(v).all())

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(entry, dict) or not vector(entry.get("sums")) or not count(entry.get("steps")) or not count(step):
        return None
    steps, routing = entry["steps"], entry.get("routing")
    if not (0 <= steps < cfg.log_every and steps <= step and step % cfg.log_every == steps):
        return None  # (another --log-every than the run's: the interval does not continue)
    if (steps == 0 and entry["sums"].any()) or (routing is not None and not vector(routing)) or \
            (counters and routing is None):
        return None  # (an empty interval with sums, counters that are not counters or missing: not a whole entry)
    return {"sums": entry["sums"].float(), "steps": steps, "routing": routing}


def routing_counters(model: DiT, reset: bool = True) -> torch.Tensor:
    """The token-routed mixtures' counters since they were last reset (tokens, token-expert slots computed, slots
    dropped, tokens without a routed expert), summed over the blocks and, under DDP, over the processes (every
    process must call it), on the CPU; then zeroed, unless ``reset`` is False (a checkpoint saves the open
    interval's)."""
    v = torch.stack([m.pop_stats() if reset else m.stats for m in model.mixtures]).sum(0)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
    return v.cpu()


def _mean_over_ranks(v: torch.Tensor) -> torch.Tensor:
    v = v.float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
        v /= torch.distributed.get_world_size()
    return v


def _log_samples(ema: DiT, diffusion, cfg: Config, dataset, logger: RunLogger, step: int, device) -> None:
    from .analysis import figure_to_array, routing_figure
    from .sample import class_grid

    grid = class_grid(ema, cfg, dataset.num_classes, per_class=8, seed=cfg.global_seed, device=device)
    logger.image("samples/grid", grid, step)
    if ema.prior is not None:
        logger.image("routing/task_expert_map", figure_to_array(routing_figure(ema, f"step {step}")), step)


def _to_yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)


__all__ = ["train", "TrainingDiverged", "global_batch_indices", "step_generator", "build_model", "update_ema",
           "save_training_state"]
