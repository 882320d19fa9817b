import pytest

from switch_dit.flops import forward_gflops


@pytest.mark.parametrize("name, paper", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-XL/2", 118.64)])
def test_dit_gflops_match_the_paper_table(name, paper):
    assert forward_gflops(name, 32, 4, 1000) == pytest.approx(paper, abs=0.03)


def test_routing_variants_cost():
    dit, dtr, sw = (forward_gflops(f"{v}-S/2", 32, 4, 1000) for v in ("DiT", "DTR", "Switch-DiT"))
    assert dtr == dit
    # merged experts: one 384 x 384 matmul per token and block (plus the per-sample merge), 12 blocks, 256 tokens
    assert sw - dit == pytest.approx(12 * (256 * 384 * 384 + 3 * 384 * 384) / 1e9, rel=0.02)
