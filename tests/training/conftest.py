import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _cpu_only():
    """These tests check bit-exact CPU behaviour (determinism, exact zeros, equal weights): make ``device="auto"``
    resolve to the CPU even on a machine with a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield
