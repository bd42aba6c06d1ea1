"""The paper's deep autoencoders (Sec. 3; widths, loss and initialisation from the reference notes)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["WIDTHS", "ACTIVATIONS", "build_autoencoder", "AutoencoderLoss", "autoencoder_loss", "num_parameters"]

#: Hidden widths of the three autoencoders (input and output are 784).
WIDTHS: dict[str, list[int]] = {
    "standard": [1000, 500, 250, 30, 250, 500, 1000],
    "deep": [1000] + [500] * 8 + [250, 30, 250] + [500] * 8 + [1000],
    "wide": [4000, 2000, 1000, 120, 1000, 2000, 4000],
    # not in the paper: a small model of the same shape for tests and quick checks
    "tiny": [64, 32, 8, 32, 64],
}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
#: The transfer function LocoProp should use for the output layer: the sigmoid inside the loss.
OUTPUT_TRANSFER = "sigmoid"


def _glorot_uniform_(tensor: torch.Tensor) -> None:
    """Glorot-uniform, also for 1-D biases (limit sqrt(3 / width), reference notes)."""
    if tensor.dim() == 2:
        fan_out, fan_in = tensor.shape
        limit = math.sqrt(6.0 / (fan_in + fan_out))
    else:
        limit = math.sqrt(3.0 / tensor.shape[0])
    with torch.no_grad():
        tensor.uniform_(-limit, limit)


def build_autoencoder(size: str = "standard", activation: str = "tanh", input_dim: int = 784,
                      dtype: torch.dtype = torch.float32, device="cpu") -> nn.Sequential:
    """``nn.Sequential`` autoencoder: every hidden layer ``activation`` except the linear code layer;
    the output layer is linear (its sigmoid lives inside :func:`autoencoder_loss`).
    """
    if size not in WIDTHS:
        raise ValueError(f"model: unknown autoencoder {size!r}; valid: {sorted(WIDTHS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {activation!r}; valid: {sorted(ACTIVATIONS)}")
    hidden = WIDTHS[size]
    code = min(hidden)
    dims = [input_dim] + hidden + [input_dim]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1])
        _glorot_uniform_(lin.weight)
        _glorot_uniform_(lin.bias)
        mods.append(lin)
        is_output = i == len(dims) - 2
        is_code = dims[i + 1] == code and i + 1 == hidden.index(code) + 1
        if not is_output and not is_code:
            mods.append(ACTIVATIONS[activation]())
    return nn.Sequential(*mods).to(device=device, dtype=dtype)


def autoencoder_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over the pixels, averaged over the batch (reference notes)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


class AutoencoderLoss(nn.Module):
    """:func:`autoencoder_loss` as a module: a ``BCEWithLogitsLoss(reduction="sum")`` divided by
    the batch size.  The K-FAC adapter extends the inner loss module with BackPACK."""

    def __init__(self) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(reduction="sum")

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, x) / x.shape[0]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
