import json

import numpy as np
import pytest
import torch

from switch_dit import create_model
from switch_dit.analysis import analyze, routing_summary, task_affinity, task_expert_map
from tests.helpers import TINY, run_cli


def test_map_rows_have_k_per_block_and_summary():
    torch.manual_seed(0)
    model = create_model("Switch-DiT-XS/2", input_size=8, in_channels=1, num_classes=10, num_experts=4, top_k=3)
    pattern = task_expert_map(model)
    assert pattern.shape == (1000, 6 * 4)
    assert (pattern.reshape(1000, 6, 4).sum(-1) == 3).all()
    s = routing_summary(pattern, 4)
    for b in s["blocks"]:
        cols = pattern[:, b["block"] * 4:(b["block"] + 1) * 4]
        assert b["shared_experts"] == [j for j in range(4) if cols[:, j].all()]
        for t in b["switch_timesteps"]:
            assert not np.array_equal(cols[t], cols[t - 1])
        assert sum(b["usage"]) == 3.0


def test_affinity():
    w = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]])
    a = task_affinity(w)
    assert a[0, 1] == 1.0 and a[0, 2] == 0.0 and np.allclose(a, a.T)


def test_analyze_cli_on_a_tiny_trained_switch_dit(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--max-steps", 3, "--ckpt-every", 3, "--results-dir", out) == 0
    assert run_cli("analyze", out / "checkpoints" / "step_0000003.pt", "--out", tmp_path / "an") == 0
    assert not (tmp_path / "an" / "task_expert_map_raw.png").exists()  # an axis-less picture nobody could read
    for f in ("task_expert_map.png", "task_affinity.png", "prior_affinity.png",
              "routing.json"):
        assert (tmp_path / "an" / f).is_file()
    summary = json.loads((tmp_path / "an" / "routing.json").read_text())
    assert summary["num_blocks"] == 6 and summary["num_experts"] == 3 and len(summary["blocks"]) == 6
    assert 0.0 <= summary["prior_agreement"] <= 1.0
    # by default a training checkpoint's analysis goes to its run's folder, an export's beside the export
    assert run_cli("analyze", out / "checkpoints" / "step_0000003.pt") == 0
    assert (out / "analysis" / "routing.json").is_file()
    (tmp_path / "x").mkdir()
    assert run_cli("export", out / "checkpoints" / "step_0000003.pt", "--out", tmp_path / "x" / "m.safetensors") == 0
    assert run_cli("analyze", tmp_path / "x" / "m.safetensors") == 0
    assert (tmp_path / "x" / "m_analysis" / "routing.json").is_file() and not (tmp_path / "analysis").exists()
    (out / "analysis" / "routing.json").unlink()
    monkeypatch.chdir(out / "checkpoints")  # a relative checkpoint path still finds its run's folder
    assert run_cli("analyze", "step_0000003.pt") == 0 and (out / "analysis" / "routing.json").is_file()
    assert run_cli("export", "step_0000003.pt", "--format", "folder", "--out", tmp_path / "folder") == 0
    monkeypatch.chdir(tmp_path / "folder")  # '.': a model folder, analysed beside itself
    assert run_cli("analyze", ".") == 0 and (tmp_path / "folder_analysis" / "routing.json").is_file()
    # a checkpoint without routing gives a clear message
    assert run_cli("train", *TINY, "--model", "DiT-XS/2", "--max-steps", 1, "--results-dir", tmp_path / "d") == 0
    capsys.readouterr()
    assert run_cli("analyze", tmp_path / "d" / "checkpoints" / "step_0000001.pt") != 0
    assert "without learned routing" in capsys.readouterr().err


def test_analyze_function_writes_files(tmp_path):
    model = create_model("Switch-DiT-XS/2", input_size=8, in_channels=1, num_classes=10)
    summary = analyze(model, tmp_path)
    assert summary["num_timesteps"] == 1000 and (tmp_path / "task_affinity.png").is_file()


def test_routing_figure_is_labelled_and_its_prior_is_matched():
    from switch_dit.analysis import matched_prior_table, routing_figure

    torch.manual_seed(0)
    model = create_model("Switch-DiT-XS/2", input_size=8, in_channels=1, num_classes=10)
    fig = routing_figure(model)
    left, right = fig.axes[:2]
    assert "timestep" in left.get_ylabel() and "block" in left.get_xlabel()
    assert "learned" in left.get_title() and "prior" in right.get_title()
    assert [t.get_text() for t in left.get_xticklabels()] == [str(b) for b in range(1, 7)]
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"expert selected (top-k)", "not selected"}
    # the matched prior is a column permutation of the table that minimises the Hamming cost
    pattern = task_expert_map(model)
    matched = matched_prior_table(model, pattern)
    table = model.prior.table.numpy()
    assert sorted(map(tuple, matched.T)) == sorted(map(tuple, table.T))
    assert np.abs(matched - pattern).sum() <= np.abs(table - pattern).sum()


def test_routing_record_agreement_is_that_of_the_best_matching_of_prior_columns():
    from switch_dit.analysis import routing_record

    torch.manual_seed(1)
    model = create_model("Switch-DiT-XS/2", input_size=8, in_channels=1, num_classes=10, num_experts=4, top_k=2)
    rec = routing_record(model)
    pattern = task_expert_map(model)
    table = model.prior.table.cpu().numpy()
    assert rec["num_blocks"] == 6 and 0.0 <= rec["prior_agreement"] <= 1.0
    # The matching maximises agreement over column orders: no fixed order (identity, reversed) does better.
    for order in (np.arange(table.shape[1]), np.arange(table.shape[1])[::-1]):
        assert rec["prior_agreement"] >= (pattern == table[:, order]).mean() - 1e-12


def test_analyze_cli_on_a_token_routed_model(tmp_path, capsys):
    """analyze on TC-MoE / EC-MoE: the fraction of each timestep bin's tokens per expert, per block, from the run's
    own data noised to every bin, with the timestep information and the load balance in routing.json."""
    for name in ("TC-MoE-XS/2", "EC-MoE-XS/2"):
        out = tmp_path / name[:2]
        assert run_cli("train", *TINY, "--model", name, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", out) == 0
        assert run_cli("analyze", out / "checkpoints" / "step_0000002.pt", "--out", out / "an") == 0
        summary = json.loads((out / "an" / "routing.json").read_text())
        assert (out / "an" / "token_expert_map.png").is_file()
        assert summary["num_blocks"] == 6 and summary["num_experts"] == 8 and summary["num_bins"] == 50
        for b in summary["blocks"]:
            frac = np.asarray(b["map"])
            assert frac.shape == (50, 8)
            # each token reaches top-2 routed experts (token choice), or 2 on average (expert choice)
            assert abs(frac.sum(1).mean() - 2.0) < 0.02
            assert 0 <= b["timestep_information_bits"] <= 3.0 and b["max_over_mean_load"] >= 1.0
            assert len(b["routed_experts_per_token"]) == 50 and 0 <= b["null_information_bits"] <= 3.0
        assert summary["mean_null_information_bits"] >= 0
        assert summary["measured_on"]["data"] == "digits" and summary["measured_on"]["images"] > 0
    # data of another kind than the model's (colour images for a grey model) is one line, not a conv error
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "rgb" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "rgb" / c / "x.png")
    capsys.readouterr()
    assert run_cli("analyze", out / "checkpoints" / "step_0000002.pt", "--data", "folder", "--data-path",
                   tmp_path / "rgb", "--out", tmp_path / "rgb_an") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gives (3, 8, 8) inputs (channels, height, width), but the model takes 1x8x8" in err
    # digits is built in: a --data-path with it would be ignored, so it is refused (train and analyze)
    capsys.readouterr()
    assert run_cli("analyze", out / "checkpoints" / "step_0000002.pt", "--data-path", tmp_path, "--out",
                   tmp_path / "x") == 2
    assert "--data digits is scikit-learn's built-in set" in capsys.readouterr().err
    assert run_cli("train", *TINY, "--data-path", tmp_path, "--results-dir", tmp_path / "y") == 2
    assert "--data-path" in capsys.readouterr().err and not (tmp_path / "y" / "checkpoints").exists()
    # --data alone measures that data set, not in the run's recorded folder of another one; a record of digits with
    # a path (accepted, and ignored, before the refusal) still loads
    state = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=False)
    for data, path in (("fashion-mnist", str(tmp_path / "nowhere")), ("digits", str(tmp_path))):
        state["config"].update(data=data, data_path=path)
        torch.save(state, tmp_path / "edited.pt")
        assert run_cli("analyze", tmp_path / "edited.pt", "--data", "digits", "--out", tmp_path / data) == 0
        assert json.loads((tmp_path / data / "routing.json").read_text())["measured_on"]["data_path"] is None


def test_routing_information_is_zero_without_and_maximal_with_timestep_specialisation():
    from switch_dit.analysis import routing_information

    assert routing_information(np.full((10, 4), 0.5)) == pytest.approx(0.0, abs=1e-12)
    onehot = np.zeros((4, 4))
    onehot[np.arange(4), np.arange(4)] = 1.0  # each bin its own expert
    assert routing_information(onehot) == pytest.approx(2.0)



def test_routing_information_weighs_bins_by_their_routed_slots():
    """Expert choice can give timesteps different numbers of experts: the information is over routed slots (a
    bin with twice the slots weighs twice), and a bin with more experts of the same mix carries none."""
    from switch_dit.analysis import routing_information, token_routing_record

    frac = np.array([[0.4, 0.0], [0.8, 0.8]])
    # joint over slots: [[.2, 0], [.4, .4]]; p(bin) = (.2, .8), p(expert) = (.6, .4)
    joint = frac / frac.sum()
    want = sum(joint[i, j] * np.log2(joint[i, j] / (joint[i].sum() * joint[:, j].sum()))
               for i in range(2) for j in range(2) if joint[i, j] > 0)
    assert routing_information(frac) == pytest.approx(want) and want == pytest.approx(0.1710, abs=1e-4)
    more = np.array([[0.25, 0.25], [1.0, 1.0]])
    assert routing_information(more) == pytest.approx(0.0, abs=1e-12)
    rec = token_routing_record(more[None], "expert-choice")
    assert rec["blocks"][0]["routed_experts_per_token"] == [0.5, 2.0]  # the compute difference is recorded


def test_permutation_null_measures_the_bias_of_a_timestep_blind_router():
    """Samples whose routing ignores their bin score about the null; routing that follows the bin scores far above
    it. The null is positive: a finite sample of a blind router still shows some information."""
    from switch_dit.analysis import permutation_null, routing_information

    rng = np.random.default_rng(0)
    R, B, E, per = 8, 10, 4, 16
    blind = rng.multinomial(per, np.full(E, 1 / E), size=(R, B, 1)).astype(float)  # (rounds, bins, 1 block, E)
    measured = routing_information(blind.sum(0).transpose(1, 0, 2)[0])
    null = permutation_null(blind, permutations=100)
    # independent slots here, so the null is the Miller-Madow bias (B - 1)(E - 1) / (2 n ln 2), n = R B per slots
    assert null.shape == (1,) and null[0] == pytest.approx((B - 1) * (E - 1) / (2 * R * B * per * np.log(2)), rel=0.3)
    assert abs(measured - null[0]) < 3 * null[0]
    follows = np.stack([rng.multinomial(per, np.eye(E)[b % E] * 0.9 + 0.025, size=(R, 1)) for b in range(B)], 1)
    assert follows.shape == (R, B, 1, E)
    info = routing_information(follows.sum(0).transpose(1, 0, 2)[0].astype(float))
    assert info > 1.0 and permutation_null(follows.astype(float), permutations=50)[0] < 0.2 * info


def test_a_one_switch_map_is_rebuilt_exactly_from_its_summary():
    from switch_dit.analysis import pattern_from_summary

    rng = np.random.default_rng(0)
    T, M, N = 1000, 3, 6
    blocks = []
    for _ in range(N):
        shared, a, b = rng.permutation(M)
        t = int(rng.integers(1, T))
        block = np.zeros((T, M))
        block[:, shared] = 1
        block[:t, a] = 1
        block[t:, b] = 1
        blocks.append(block)
    pattern = np.concatenate(blocks, axis=1)
    assert np.array_equal(pattern_from_summary(routing_summary(pattern, M), 2), pattern)
    two_switches = pattern.copy()
    two_switches[500:600, :M] = two_switches[500:600, :M][:, ::-1]
    assert pattern_from_summary(routing_summary(two_switches, M), 2) is None  # not exact: refused
