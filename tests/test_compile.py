"""The forward of every variant traces into one graph (no host work inside), in training and in sampling."""
import pytest
import torch

from switch_dit import create_model


def _inputs():
    return torch.randn(4, 1, 8, 8), torch.tensor([3, 250, 600, 999]), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("name", ["DiT-XS/4", "DTR-XS/4", "Switch-DiT-XS/4", "TC-MoE-XS/4", "EC-MoE-XS/4",
                                  "DiffMoE-XS/4"])
def test_forward_has_no_graph_break(name):
    torch._dynamo.reset()
    model = create_model(name, input_size=8, in_channels=1, num_classes=10)
    x, t, y = _inputs()
    kwargs = {"prior_target": model.matched_prior_table()} if model.prior is not None else {}
    explained = torch._dynamo.explain(model.train())(x, t, y, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    with torch.no_grad():
        explained = torch._dynamo.explain(model.eval())(x, torch.full((4,), 500), y)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_prior_target_from_the_trainer_equals_the_model_matching_itself():
    torch.manual_seed(0)
    model = create_model("Switch-DiT-XS/4", input_size=8, in_channels=1, num_classes=10).train()
    with torch.no_grad():
        for r in model.switch_routers:
            r.gate[1].weight.normal_(0, 0.5)
    x, t, y = _inputs()
    state = model.prior.rng_state()
    inside = model(x, t, y).aux_loss
    model.prior.set_rng_state(state)
    outside = model(x, t, y, prior_target=model.matched_prior_table()).aux_loss
    assert inside.item() > 0 and torch.equal(inside, outside)


def test_compiled_training_and_sampling_equal_eager(tmp_path):
    """`train --compile` (inductor) runs 2 steps to the eager run's weights, and `sample --compile` draws the
    eager sampler's images, on an XS Switch-DiT (the variant with host work around the forward)."""
    import numpy as np

    from tests.helpers import TINY, load_state, run_cli

    args = [*TINY, "--model", "Switch-DiT-XS/4", "--max-steps", 2, "--ckpt-every", 2, "--sample-every", 0]
    assert run_cli("train", *args, "--results-dir", tmp_path / "eager") == 0
    assert run_cli("train", *args, "--results-dir", tmp_path / "compiled", "--compile") == 0
    ckpt = "checkpoints/step_0000002.pt"
    eager, compiled = load_state(tmp_path / "eager" / ckpt), load_state(tmp_path / "compiled" / ckpt)
    from switch_dit.integrations import read_metrics
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("eager", "compiled")]
    assert len(losses[0]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0)
    moved = 0.0
    for k, v in eager["model"].items():
        # Adam's step is about lr * sign(grad), so float noise in a near-zero gradient moves a weight by up to
        # ~1e-5 here; a wrong gradient would move it by ~lr = 1e-3
        assert torch.allclose(compiled["model"][k], v, rtol=0, atol=1e-4), k
        moved = max(moved, (v - eager["ema"][k]).abs().max().item())
    assert moved > 1e-3  # the two steps did change the weights (the EMA, decay 0.9999, stays near the start)

    sample = ["sample", tmp_path / "eager" / ckpt, "--sampler", "ddim", "--num-sampling-steps", 2,
              "--class-labels", 0, 1, 2, 3, "--cfg-scale", 2, "--no-progress"]
    assert run_cli(*sample, "--out", tmp_path / "eager.png") == 0
    assert run_cli(*sample, "--out", tmp_path / "compiled.png", "--compile") == 0
    from PIL import Image
    a = np.asarray(Image.open(tmp_path / "eager.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "compiled.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # equal up to a rounding step of uint8
