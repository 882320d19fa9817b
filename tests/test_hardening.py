"""Faults on purpose: a second run in one folder, failed writes, kill -9 leftovers, divergence advice, bad input."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from switch_dit import checkpoint as ckpt
from switch_dit.checkpoint import CheckpointWriteError, RunLock, atomic_save, last_good_step
from switch_dit.checkpoint import list_checkpoints
from tests.helpers import TINY, load_state, run_cli


def _one_line_error(capsys, *args, code=2):
    capsys.readouterr()
    assert run_cli(*args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_second_run_in_the_same_folder_is_refused_and_a_dead_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f'{{"pid": {child.pid}, "host": "{os.uname().nodename}", "started": "then"}}')
        err = _one_line_error(capsys, "train", *TINY, "--max-steps", 1, "--results-dir", out)
        assert f"in use by another training run (pid {child.pid} on {os.uname().nodename}" in err
        assert "another --results-dir" in err
    finally:
        child.kill()
        child.wait()
    # the process is gone now: its lock is taken over with a warning, and released at the end
    with pytest.warns(UserWarning, match=f"taking over the lock of run pid {child.pid}"):
        assert run_cli("train", *TINY, "--max-steps", 1, "--results-dir", out) == 0
    assert not (out / ".lock").exists()
    with RunLock(out):
        with pytest.raises(ValueError, match="in use by another training run"):
            RunLock(out).acquire()


def test_write_failures_are_one_line_and_keep_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", out) == 0
    good = (out / "checkpoints" / "step_0000002.pt").read_bytes()
    for exc, words in ((OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
                       (PermissionError(errno.EACCES, "Permission denied"), "the folder is not writable"),
                       (RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing "
                                     "file data/0: file write failed"), "RuntimeError")):
        def failing_save(obj, f, exc=exc):
            f.write(b"partial")
            raise exc
        monkeypatch.setattr(ckpt.torch, "save", failing_save)
        err = _one_line_error(capsys, "train", *TINY, "--max-steps", 4, "--ckpt-every", 2, "--results-dir", out,
                              "--resume", "auto")
        assert f"could not write checkpoint step_0000004.pt in {out / 'checkpoints'}: {words}" in err
        assert "--resume auto" in err and "intact" in err
        monkeypatch.undo()
        assert (out / "checkpoints" / "step_0000002.pt").read_bytes() == good
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002.pt"]  # no temp file left


def test_file_size_limit_is_one_line(tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from switch_dit.checkpoint import atomic_save, CheckpointWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            atomic_save({{"w": torch.zeros(1_000_000)}}, "{tmp_path}/step_0000001.pt")
        except CheckpointWriteError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "could not write checkpoint step_0000001.pt" in out.stdout and "file-size limit" in out.stdout, out
    assert not list(tmp_path.iterdir())


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", out) == 0
    stale = out / "checkpoints" / ".step_0000002.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    assert run_cli("train", *TINY, "--max-steps", 2, "--ckpt-every", 1, "--results-dir", out, "--resume", "auto") == 0
    assert not stale.exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_0000002.pt"


def test_last_good_step():
    assert last_good_step({}) is None
    assert last_good_step({2: 0.5, 4: 0.2, 6: 0.3}) == 6
    assert last_good_step({2: 0.5, 4: 0.2, 6: 1e9, 8: float("nan")}) == 4
    assert last_good_step({2: float("inf")}) is None


def test_divergence_advice_names_a_checkpoint_that_trains_on(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TINY, "--results-dir", out, "--keep-last", 1]
    assert run_cli("train", *base, "--max-steps", 4, "--ckpt-every", 2) == 0
    err = _one_line_error(capsys, "train", *base, "--max-steps", 12, "--ckpt-every", 1, "--lr", 1e6,
                          "--resume", "auto", code=3)
    good = out / "checkpoints" / "step_0000004.pt"
    assert f"The newest checkpoint that trained well is {good}" in err and f"--resume {good} --lr 0.0001" in err
    assert good.exists()  # kept although --keep-last 1: it is the last good one
    # following the advice to the letter trains on to the end
    advice = err.split("learning rate: ")[1].split(" (or")[0].split()
    assert advice == ["--resume", str(good), "--lr", "0.0001"]
    assert run_cli("train", *base, "--max-steps", 8, "--ckpt-every", 2, *advice) == 0
    final = load_state(out / "checkpoints" / "step_0000008.pt")
    assert final["step"] == 8 and all(torch.isfinite(v).all() for v in final["model"].values())
    assert max(v.abs().max().item() for v in final["model"].values()) < 100


@pytest.mark.parametrize("args, words", [
    (["--config", "BAD_YAML"], "is not valid YAML at line 2"),
    (["--config", "YAML:global_batch_size: sixteen"], "global-batch-size must be an integer, got 'sixteen'"),
    (["--config", "YAML:lr: [1, 2]"], "option lr must be a number, got [1, 2]"),
    (["--config", "YAML:ema_warmup: maybe"], "ema-warmup must be true or false"),
    (["--image-size", "0"], "--image-size must be between 1 and 4096 pixels, got 0"),
    (["--image-size", "-8"], "--image-size must be between 1 and 4096 pixels, got -8"),
    (["--image-size", "7"], "not divisible by the patch size 2"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    (["--noise-schedule", "quadratic"], "--noise-schedule must be linear or cosine"),
    (["--data", "imagenet"], "--data must be fashion-mnist, digits, folder or latents"),
    (["--top-k", "4"], "--top-k=4 must be between 1 and --num-experts=3"),
    (["--model", "Switch-DiT-Q/2"], "unknown model name"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such checkpoint file"),
])
def test_bad_training_input_is_one_line(tmp_path, capsys, args, words):
    args = list(args)
    if args[0] == "--config":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("max_steps: 2\nlr: : 3\n" if args[1] == "BAD_YAML" else args[1][5:] + "\n")
        args[1] = cfg
    # YAML values lose to flags, so the YAML cases leave out TINY's --lr and --global-batch-size
    base = list(TINY)
    if args[0] == "--config":
        for flag in ("--lr", "--global-batch-size"):
            i = base.index(flag)
            del base[i: i + 2]
    err = _one_line_error(capsys, "train", *base, "--max-steps", 1, "--results-dir", tmp_path / "r", *args)
    assert words in err, err


def test_yaml_number_as_string_is_accepted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('lr: "1e-3"\nmax_steps: 1\n')  # YAML reads 1e-3 as a string; it is still a number
    out = tmp_path / "r"
    assert run_cli("train", *TINY, "--config", cfg, "--results-dir", out) == 0
    assert load_state(out / "checkpoints" / "step_0000001.pt")["config"]["lr"] == 1e-3


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", out) == 0
    return out / "checkpoints" / "step_0000001.pt"


@pytest.mark.parametrize("args, words", [
    (["--num-fid-samples", "-5"], "--num-fid-samples must be >= 0, got -5"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--per-class", "0"], "--per-class must be >= 1"),
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    (["--class-labels", "12"], "class 12 is out of range: this model has classes 0..9"),
    (["--sampler", "euler"], "--sampler euler does not apply to this ddpm model: use one of ddpm, ddim, dpm++"),
])
def test_bad_sampling_input_is_one_line(tiny_ckpt, tmp_path, capsys, args, words):
    err = _one_line_error(capsys, "sample", tiny_ckpt, "--out", tmp_path / "x.png", "--no-progress", *args)
    assert words in err, err


def test_checkpoint_with_our_tag_but_missing_keys(tiny_ckpt, tmp_path, capsys):
    state = load_state(tiny_ckpt)
    del state["ema"], state["opt"]
    broken = tmp_path / "run" / "checkpoints" / "step_0000001.pt"
    broken.parent.mkdir(parents=True)
    torch.save(state, broken)
    err = _one_line_error(capsys, "sample", broken, "--out", tmp_path / "x.png")
    assert "no ema" in err and "damaged" in err
    err = _one_line_error(capsys, "train", *TINY, "--max-steps", 2, "--results-dir", tmp_path / "run",
                          "--resume", "auto")
    assert "no ema, opt" in err and "damaged" in err


def test_errors_under_torchrun_are_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert run_cli("train", *TINY, "--image-size", 0, "--results-dir", tmp_path / "r") == 2
    assert capsys.readouterr().err == ""


def _race(args):
    import time

    from switch_dit.checkpoint import RunLock

    folder, start_at, hold = args
    lock = RunLock(folder)
    while time.time() < start_at:  # all contenders start together
        pass
    try:
        lock.acquire()
    except ValueError:
        return 0
    time.sleep(hold)  # keep it while the others try
    lock.release()
    return 1


def test_the_run_lock_cannot_be_raced(tmp_path):
    """Two to eight processes take RESULTS/.lock at the same instant, 120 times: exactly one wins every time, and
    a stale lock (a dead pid, or a live pid whose start time differs: pid reuse) is taken over by exactly one."""
    import json
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")
    with ctx.Pool(8) as pool:
        for trial in range(120):
            n = 2 + trial % 7
            folder = tmp_path / f"t{trial}"
            folder.mkdir()
            if trial % 3 == 1:  # a stale lock left by a dead run
                (folder / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename}))
            elif trial % 3 == 2:  # our own pid, recorded with another start time: a reused pid
                (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                          "start": -1}))
            start = time.time() + 0.05
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wins = pool.map(_race, [(folder, start, 0.05)] * n)
            assert sum(wins) == 1, (trial, n, wins)
            assert not (folder / ".lock").exists()


def test_the_divergence_advice_works_when_followed(tmp_path, capsys):
    """Normal steps, then a huge lr: training diverges; the advice names a checkpoint saved before the explosion
    (judged against the run's best smoothed loss, not only the other checkpoints) and flags that, followed
    exactly, train on at about the pre-divergence loss."""
    import re
    import shlex

    from switch_dit.integrations import read_metrics

    out = tmp_path / "run"
    base = [*TINY, "--model", "DiT-XS/2", "--ckpt-every", 10, "--keep-last", 1, "--results-dir", out]
    assert run_cli("train", *base, "--max-steps", 40) == 0
    before = [m["train/loss"] for m in read_metrics(out / "metrics.jsonl")][-10:]
    capsys.readouterr()
    assert run_cli("train", *base, "--max-steps", 80, "--resume", "auto", "--lr", "300") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume from it with a smaller learning rate" in err, err
    flags = shlex.split(re.search(r": (--resume \S+ --lr \S+)", err).group(1))
    assert flags[1].endswith("step_0000040.pt")  # the last checkpoint before the lr change, though keep-last is 1
    state = load_state(flags[1])
    assert state["loss_trace"]["best"] < 2 and state["loss_trace"]["smoothed"] < 2
    assert run_cli("train", *base, "--max-steps", 60, *flags) == 0
    after = [m["train/loss"] for m in read_metrics(out / "metrics.jsonl") if m["step"] > 50]
    assert max(after) < 2 * max(before), (before, after)


def test_checkpoints_and_exports_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert run_cli("train", *TINY, "--max-steps", 1, "--ckpt-every", 1, "--results-dir", tmp_path / "r") == 0
        ckpt = tmp_path / "r" / "checkpoints" / "step_0000001.pt"
        assert run_cli("export", ckpt, "--out", tmp_path / "m.safetensors") == 0
        for f in (ckpt, tmp_path / "m.safetensors"):
            assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))
    finally:
        os.umask(old)
