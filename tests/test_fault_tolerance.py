"""Long-run guarantees under torchrun: a killed worker is restarted and the job ends with the weights of an
uninterrupted run; two launches with --nnodes=2 (multi-node simulated on one machine) train and resume to the
weights of one process with the same global batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from switch_dit.checkpoint import list_checkpoints
from tests.helpers import free_port, load_state, run_cli

TRAIN = ["--data", "digits", "--image-size", "8", "--model", "Switch-DiT-XS/2", "--global-batch-size", "8",
         "--lr", "1e-3", "--log-every", "5", "--tensorboard", "false", "--no-progress", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def torchrun(*args: str, port: int, log, nnodes: int = 1, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=test{port}", "-m", "switch_dit", "train", *TRAIN, *map(str, args)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, text=True)


def assert_same_weights(a, b, exact=False):
    """Equal weights, EMA and optimizer moments; across process counts up to the float noise of a different
    reduction order (which Adam's normalised steps can lift to ~1e-5 on a few near-zero gradients)."""
    a, b = load_state(a), load_state(b)
    assert a["step"] == b["step"]
    pairs = [(f"{p}.{k}", a[p][k], b[p][k]) for p in ("model", "ema") for k in a[p]]
    pairs += [(f"opt.{i}.{k}", v, b["opt"]["state"][i][k]) for i, s in a["opt"]["state"].items()
              for k, v in s.items() if k != "step"]
    for name, x, y in pairs:
        if exact:
            assert torch.equal(x, y), name
        else:
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-4), (name, (x - y).abs().max().item())


def test_killed_worker_is_restarted_and_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 30
    with open(tmp_path / "plain.log", "w") as log:  # the same job, never interrupted
        assert torchrun("--max-steps", steps, "--ckpt-every", 5, "--results-dir", tmp_path / "plain",
                        port=free_port(), log=log).wait(timeout=300) == 0

    out = tmp_path / "elastic"
    with open(tmp_path / "torchrun.log", "w") as log:
        job = torchrun("--max-steps", steps, "--ckpt-every", 5, "--results-dir", out, "--resume", "auto",
                       port=free_port(), log=log, restarts=2)
        target = out / "checkpoints" / "step_0000010.pt"
        while not target.exists() and job.poll() is None:
            time.sleep(0.01)
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2 and job.poll() is None, "the job ended before a worker could be killed"
        os.kill(int(workers[-1]), signal.SIGKILL)
        assert job.wait(timeout=300) == 0
    text = (tmp_path / "torchrun.log").read_text()
    assert "exitcode: -9" in text  # the kill was seen, and the group restarted once from the last checkpoint
    starts = [line for line in text.splitlines() if "2 process(es) on cpu, steps" in line]
    assert len(starts) == 2 and starts[0].endswith(f"steps 0 -> {steps}")
    resumed_from = int(starts[1].split("steps ")[1].split(" ->")[0])
    assert 10 <= resumed_from < steps
    final = f"checkpoints/step_{steps:07d}.pt"
    assert_same_weights(tmp_path / "plain" / final, out / final, exact=True)
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step_{steps:07d}.pt"


def test_two_node_launch_trains_and_resumes_like_one_process(tmp_path):
    """Two torchrun launches, --nnodes=2 with a c10d rendezvous on localhost, one process each (the README's
    multi-node command with 127.0.0.1 as the endpoint)."""
    out = tmp_path / "nodes"
    for steps in (4, 8):  # the second launch resumes the first's checkpoint
        port = free_port()
        logs = [open(tmp_path / f"node{n}_{steps}.log", "w") for n in range(2)]
        jobs = [torchrun("--max-steps", steps, "--ckpt-every", 4, "--results-dir", out, "--resume", "auto",
                         port=port, log=logs[n], nnodes=2, nproc=1) for n in range(2)]
        codes = [j.wait(timeout=300) for j in jobs]
        for f in logs:
            f.close()
        assert codes == [0, 0], [(tmp_path / f"node{n}_{steps}.log").read_text()[-2000:] for n in range(2)]
    text = "".join((tmp_path / f"node{n}_8.log").read_text() for n in range(2))
    assert "2 process(es) on cpu, steps 4 -> 8" in text

    one = tmp_path / "one"
    assert run_cli("train", *TRAIN, "--max-steps", 4, "--ckpt-every", 4, "--results-dir", one) == 0
    assert_same_weights(one / "checkpoints/step_0000004.pt", out / "checkpoints/step_0000004.pt")
    assert run_cli("train", *TRAIN, "--max-steps", 8, "--ckpt-every", 4, "--results-dir", one,
                   "--resume", "auto") == 0
    assert_same_weights(one / "checkpoints/step_0000008.pt", out / "checkpoints/step_0000008.pt")
