"""The forward of every variant traces into one graph (no host work inside), in training and in sampling."""
import pytest
import torch

from switch_dit import create_model


def _inputs():
    return torch.randn(4, 1, 8, 8), torch.tensor([3, 250, 600, 999]), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("name", ["DiT-XS/4", "DTR-XS/4", "Switch-DiT-XS/4"])
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
