"""Suite-wide settings.

One intra-op thread for every test: the tiny models here gain nothing from threads, and on a busy 2-core
machine the threads' spin-waits made tiny-model encodes ~20x slower in CPU time (docs/reliability.md).
Results do not depend on it: every kernel computes the same fp32 values with one thread or two.
"""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
