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
    assert rmap.shape[0] == 1000
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/loss", "train/prior_loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert {"samples/grid", "routing/task_expert_map"} <= set(acc.Tags()["images"])
