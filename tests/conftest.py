import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-zero random values (zero-initialised layers would hide bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module
