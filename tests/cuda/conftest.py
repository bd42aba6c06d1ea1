import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Every CUDA test compares FP32 paths: TF32 products off unless a test turns them on itself."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
