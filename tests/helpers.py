"""Shared helpers for the pipeline tests: tiny configs on scikit-learn digits, running the CLI in-process."""
from __future__ import annotations

import os
import socket

import torch

from switch_dit.cli import main

TINY = ["--data", "digits", "--image-size", "8", "--model", "Switch-DiT-XS/2", "--global-batch-size", "8",
        "--lr", "1e-3", "--log-every", "1", "--tensorboard", "false", "--no-progress"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def load_state(path):
    from switch_dit.checkpoint import load
    return load(path)  # the weights-only loader: our own checkpoints must pass it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def run_processes(target, world: int, *args, timeout: float = 240) -> None:
    """Run target(rank, world, port, *args) in `world` spawned processes (a gloo group); all must succeed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        assert p.exitcode == 0, f"process exited with {p.exitcode}"
