import pytest
import torch

from switch_dit import ModelOutput, create_model
from switch_dit.models.dit import MODEL_SIZES
from tests.conftest import randomize_


def _batch(n=4, c=4, s=16, classes=10):
    return torch.randn(n, c, s, s), torch.randint(0, 1000, (n,)), torch.randint(0, classes, (n,))


def _shared_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    return missing


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_switch_dit_at_init_is_exactly_dit(mode):
    dit = randomize_(create_model("DiT-XS/2", input_size=16, num_classes=10, class_dropout_prob=0.0))
    sw = create_model("Switch-DiT-XS/2", input_size=16, num_classes=10, class_dropout_prob=0.0)
    missing = _shared_weights(dit, sw)
    assert missing and all(".router." in k for k in missing)
    x, t, y = _batch()
    getattr(dit, mode)(), getattr(sw, mode)()
    with torch.no_grad():
        a, b = dit(x, t, y).sample, sw(x, t, y).sample
    assert torch.equal(a, b)
    # A shared timestep (the sampling path with one mask row) is exact too.
    with torch.no_grad():
        t1 = torch.full_like(t, 17)
        assert torch.equal(dit(x, t1, y).sample, sw(x, t1, y).sample)


def test_dtr_with_beta_one_is_dit():
    dit = randomize_(create_model("DiT-XS/2", input_size=16, num_classes=10, class_dropout_prob=0.0))
    dtr = create_model("DTR-XS/2", input_size=16, num_classes=10, class_dropout_prob=0.0, dtr_beta=1.0)
    assert _shared_weights(dit, dtr) == []  # DTR has no parameters of its own
    x, t, y = _batch()
    assert torch.equal(dit(x, t, y).sample, dtr(x, t, y).sample)


def test_dtr_default_changes_the_output():
    dit = randomize_(create_model("DiT-XS/2", input_size=16, num_classes=10))
    dtr = create_model("DTR-XS/2", input_size=16, num_classes=10)
    _shared_weights(dit, dtr)
    dit.eval(), dtr.eval()
    x, t, y = _batch()
    assert not torch.allclose(dit(x, t, y).sample, dtr(x, t, y).sample)


@pytest.mark.parametrize("name", ["DiT-XS/2", "DTR-XS/4", "Switch-DiT-XS/2"])
def test_output_type_and_shape_same_in_train_and_eval(name):
    model = create_model(name, input_size=16, in_channels=3, num_classes=10)
    x, t, y = _batch(c=3)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(x, t, y)
        assert isinstance(out, ModelOutput)
        assert out.sample.shape == (4, 6, 16, 16)
        assert out.aux_loss.shape == ()
        if mode == "eval" or not name.startswith("Switch"):
            assert out.aux_loss.item() == 0.0
    model.train()
    aux = model(x, t, y).aux_loss
    assert (aux.item() > 0) == name.startswith("Switch")


def test_aux_loss_is_lambda_times_prior_and_trains_the_gate():
    x, t, y = _batch()
    vals = {}
    for lam in (1.0, 2.5):
        torch.manual_seed(3)
        m = create_model("Switch-DiT-XS/2", input_size=16, num_classes=10, lambda_dp=lam)
        vals[lam] = m(x, t, y).aux_loss
    assert torch.allclose(vals[2.5], 2.5 * vals[1.0])
    vals[1.0].backward()
    gate = m.blocks[0].router.gate[1].weight
    assert gate.grad is None  # the graph of vals[2.5] was not backpropagated
    vals[2.5].backward()
    assert m.blocks[0].router.gate[1].weight.grad.abs().sum() > 0


def test_no_learned_sigma_and_unconditional():
    model = create_model("Switch-DiT-XS/4", input_size=16, in_channels=1, num_classes=1, learn_sigma=False)
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([0, 999]), torch.zeros(2, dtype=torch.long))
    assert out.sample.shape == (2, 1, 16, 16)


def test_unpatchify_inverts_patchify_layout():
    model = create_model("DiT-XS/4", input_size=16, in_channels=2, num_classes=10, learn_sigma=False)
    img = torch.randn(3, 2, 16, 16)
    p = 4
    # tokens in row-major patch order, each patch flattened as (p, p, C)
    tokens = img.reshape(3, 2, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, p * p * 2)
    assert torch.equal(model.unpatchify(tokens), img)


def test_forward_with_cfg_scale_one_is_conditional():
    model = randomize_(create_model("Switch-DiT-XS/2", input_size=16, num_classes=10)).eval()
    x, t, y = _batch(n=3)
    null = torch.full_like(y, 10)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    with torch.no_grad():
        guided = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.0).sample
        cond = model(x, t, y).sample
        assert torch.allclose(guided[:3], cond, atol=1e-5)
        g4 = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0).sample
        g4_3ch = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0, cfg_channels=3).sample
        uncond = model(x, t, null).sample
    expect = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(g4[:3, :4], expect, atol=1e-4)
    assert torch.allclose(g4_3ch[:3, :3], expect[:, :3], atol=1e-4)
    assert torch.allclose(g4_3ch[:3, 3:], cond[:, 3:], atol=1e-5)  # unguided channels: the conditional half
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(xx, tt, yy, 2.0, cfg_channels=5)


def test_grad_checkpointing_matches():
    x, t, y = _batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        m = randomize_(create_model("Switch-DiT-XS/2", input_size=16, num_classes=10, grad_checkpointing=ckpt,
                                    class_dropout_prob=0.0))
        out = m(x, t, y)
        (out.sample.square().mean() + out.aux_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# The released DiT-XL/2 state dict: every key and shape (built on the meta device, no memory).
def _dit_xl2_keys(depth=28, D=1152, classes=1000, n_tokens=256):
    keys = {"pos_embed": (1, n_tokens, D), "x_embedder.proj.weight": (D, 4, 2, 2), "x_embedder.proj.bias": (D,),
            "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
            "t_embedder.mlp.2.bias": (D,), "y_embedder.embedding_table.weight": (classes + 1, D),
            "final_layer.linear.weight": (32, D), "final_layer.linear.bias": (32,),
            "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D),
                     b + "attn.proj.bias": (D,), b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                     b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
                     b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    return keys


def test_dit_xl2_state_dict_matches_released_checkpoint_layout():
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=32)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd == _dit_xl2_keys()
    # A checkpoint with exactly those keys loads strictly.
    small = create_model("DiT-XS/2", input_size=16, num_classes=10)
    small.load_state_dict({k: torch.randn_like(v) for k, v in small.state_dict().items()}, strict=True)


def test_parameter_counts_match_the_paper():
    counts = {}
    for name in ("DiT-S/2", "Switch-DiT-S/2"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in create_model(name, input_size=32).parameters())
    assert round(counts["DiT-S/2"] / 1e6) == 33
    depth, D, _ = MODEL_SIZES["S"]
    assert counts["Switch-DiT-S/2"] - counts["DiT-S/2"] == depth * (3 * D * D + 3 * D + D * 3 + 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="Switch-DiT-S/2", top_k=4, num_experts=3), "top_k"),
    (dict(name="Switch-DiT-S/2", top_k=0), "top_k"),
    (dict(name="Switch-DiT-S/2", lambda_dp=-1.0), "lambda_dp"),
    (dict(name="Switch-DiT-S/2", num_experts=0), "num_experts"),
    (dict(name="DiT-Q/2"), "unknown model name"),
    (dict(name="Switch-DiT-S/3"), "unknown model name"),
    (dict(name="dit-s/2"), "unknown model name"),
    (dict(name="DiT-S/4", input_size=30), "input_size=30"),
    (dict(name="DTR-S/2", dtr_beta=1.5), "dtr_beta"),
    (dict(name="DiT-S/2", num_classes=0), "num_classes"),
    (dict(name="DiffMoE-S/2", moe_experts=0), "moe_experts must be >= 1"),
    (dict(name="EC-MoE-S/2", moe_experts=2.0), "moe_experts must be an integer, got 2.0"),
    (dict(name="Switch-DiT-S/2", top_k=True), "top_k must be an integer"),
])
def test_bad_options_raise_value_error_naming_the_option(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            create_model(name, **kwargs)


@pytest.mark.parametrize("name", ["DiT-XS/4", "DTR-XS/4", "Switch-DiT-XS/4", "TC-MoE-XS/4", "EC-MoE-XS/4",
                                  "DiffMoE-XS/4"])
def test_an_empty_batch_gives_an_empty_output_and_no_aux_loss(name):
    """N = 0 through the Python API (a script's last, empty chunk): an empty output of the right shape and a zero aux
    loss in train and eval, not a division by zero (capacities) or a NaN (the prior loss's mean over no samples)."""
    model = create_model(name, input_size=16, in_channels=1, num_classes=10)
    for training in (True, False):
        model.train(training)
        out = model(torch.randn(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        assert out.sample.shape == (0, 2, 16, 16) and out.aux_loss.item() == 0.0
        assert model.forward_with_cfg(torch.randn(0, 1, 16, 16), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, dtype=torch.long), 1.5).sample.shape == (0, 2, 16, 16)
