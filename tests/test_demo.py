import numpy as np

from tests.helpers import run_cli


def test_demo_writes_grid_routing_map_and_tensorboard(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo"
    code = run_cli("demo", "--data", "digits", "--image-size", 8, "--model", "Switch-DiT-XS/2", "--max-steps", 4,
                   "--global-batch-size", 8, "--sample-every", 2, "--num-sampling-steps", 3, "--warmup-steps", 1,
                   "--results-dir", out, "--no-progress")
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "samples_grid.png") in printed and str(out / "routing_map.png") in printed
    grid = np.array(Image.open(out / "samples_grid.png"))
    assert grid.shape[0] == 8 * (2 + 10 * 10)  # ten class rows of 8x8 samples, scaled up to 64 px
    rmap = np.array(Image.open(out / "routing_map.png"))
    assert rmap.ndim == 3 and rmap.shape[1] > rmap.shape[0]  # the labelled figure: learned | prior, side by side
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/loss", "train/prior_loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert {"samples/grid", "routing/task_expert_map"} <= set(acc.Tags()["images"])


def test_time_budget_chooses_the_step_count_that_fits(tmp_path, capsys):
    import yaml

    from tests.helpers import TINY, load_state

    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 100000, "--time-budget", 1.5, "--ckpt-every", 100000,
                   "--log-every", 1000, "--results-dir", out) == 0
    printed = capsys.readouterr().out
    assert "[switch-dit] time budget 1.5 s:" in printed and "(--max-steps 100000)" in printed
    (ckpt,) = list((out / "checkpoints").glob("step_*.pt"))
    state = load_state(ckpt)
    chosen = state["config"]["max_steps"]
    assert 25 <= chosen < 100000 and state["step"] == chosen
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == chosen


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, monkeypatch, capsys):
    """train into a folder that holds a run's checkpoints is refused in one line (it would overwrite the config and
    the log and mix two runs' checkpoints); --resume auto continues it. A rerun of the demo keeps the earlier demo
    and writes results/demo-2."""
    from tests.helpers import TINY

    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", run) == 0
    before = (run / "metrics.jsonl").read_text()
    assert run_cli("train", *TINY, "--max-steps", 1, "--results-dir", run) == 2
    assert "already holds a run (checkpoints up to step_0000002.pt): continue it with --resume auto" in \
        capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    assert run_cli("train", *TINY, "--max-steps", 3, "--ckpt-every", 3, "--results-dir", run, "--resume", "auto") == 0
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "results" / "demo" / "checkpoints"
    old.mkdir(parents=True)
    (old / "step_0000007.pt").write_bytes(b"an earlier demo")
    assert run_cli("demo", *TINY, "--max-steps", 2, "--num-sampling-steps", 2) == 0
    assert (old / "step_0000007.pt").read_bytes() == b"an earlier demo" and len(list(old.iterdir())) == 1
    assert (tmp_path / "results" / "demo-2" / "checkpoints" / "step_0000002.pt").is_file()
    assert "results/demo-2/samples_grid.png" in capsys.readouterr().out
