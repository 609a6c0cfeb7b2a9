"""Deep layer stacks solved in parallel over depth: Newton + PCR forward, PCR adjoint backward (DeepPCR)."""

from .blocks import Residual
from .sequential import DEFAULT_MAX_ITERS, MODES, PCRSequential
from .stacking import LayerStack

__all__ = ["DEFAULT_MAX_ITERS", "MODES", "LayerStack", "PCRSequential", "Residual"]
