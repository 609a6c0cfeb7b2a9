"""Building blocks for deep layer stacks."""

import math

from torch import nn


class Residual(nn.Module):
    """The residual block `x + scale * fn(x)`, for `fn` mapping a state `(batch, *state)` to the same shape.

    E.g. `Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh()), scale=0.1)`, a pre-norm MLP block,
    or `Residual(nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Conv2d(C, C, 3, padding=1)))` on `(B, C, H, W)`.
    """

    def __init__(self, fn: nn.Module, scale: float = 1.0):
        super().__init__()
        if not isinstance(fn, nn.Module):
            raise TypeError(f"`fn` must be an nn.Module, got {type(fn).__name__}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"`scale` must be a finite number, got {scale!r}.")
        self.fn = fn
        self.scale = float(scale)

    def forward(self, x):
        return x + self.scale * self.fn(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
