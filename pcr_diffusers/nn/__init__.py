"""Deep layer stacks solved in parallel over depth: Newton + PCR forward, PCR adjoint backward (DeepPCR)."""

from .blocks import Residual
from .jacobians import (
    AUTO_EXACT_MAX_SIZE,
    DAMPING_NAMES,
    EXACT_MAX_SIZE,
    JACOBIAN_NAMES,
    DampedJacobian,
    SampleDiagonalJacobian,
    TrustRegionJacobian,
)
from .sequential import DEFAULT_MAX_ITERS, MODES, PCRSequential
from .stacking import LayerStack

__all__ = [
    "AUTO_EXACT_MAX_SIZE",
    "DAMPING_NAMES",
    "DEFAULT_MAX_ITERS",
    "EXACT_MAX_SIZE",
    "JACOBIAN_NAMES",
    "MODES",
    "DampedJacobian",
    "LayerStack",
    "PCRSequential",
    "Residual",
    "SampleDiagonalJacobian",
    "TrustRegionJacobian",
]
