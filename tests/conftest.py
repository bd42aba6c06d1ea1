import pytest
import torch
from torch import nn

from locoprop.precision import float32_products

# tests/cuda checks the fast solver on a GPU (run by benchmarks/gpu_session.py); without one it is not collected
if not torch.cuda.is_available():
    collect_ignore_glob = ["cuda/*"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """FP32 comparisons (tests/cuda among them): TF32 products off unless a test turns them on itself (through
    PyTorch's newer setting where it has one, so that a test may use either: locoprop.precision)."""
    with float32_products(False):
        yield


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter on (``TRITON_INTERPRET=1``: the kernels' source executed with NumPy on CPU tensors)
    and the kernels on (a test may turn them off), both undone after the test."""
    from locoprop import triton_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernels, "_DISABLED", [])
    assert triton_kernels.available(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def mixed_mlp(dtype=torch.float64, widths=(12, 10, 9, 8, 7, 12)):
    """A random MLP with several transfer functions of Table 2 (outputs are logits)."""
    acts = [nn.Tanh(), nn.Softplus(), nn.LeakyReLU(0.1), nn.ELU(0.7), nn.Sigmoid()]
    mods = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            mods.append(acts[i % len(acts)])
    return nn.Sequential(*mods).to(dtype)


def small_autoencoder(dtype=torch.float32, d=20):
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 6), nn.Linear(6, 16), nn.Tanh(),
                         nn.Linear(16, d)).to(dtype)


def bce_sum_mean(logits, x):
    """The paper's loss: sigmoid cross-entropy summed over pixels, mean over the batch."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


# One intra-op thread per test process: `make test` runs two pytest-xdist workers on the two cores,
# and small matrix products thrash when OpenMP threads compete for a busy core.
torch.set_num_threads(1)
