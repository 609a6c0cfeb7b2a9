"""The generic DeepPCR core: linear recurrences by parallel cyclic reduction and Newton over whole chains.

Torch only; never imports diffusers.
"""

from .jacobians import (
    JACOBIANS,
    CallableJacobian,
    ConstantJacobian,
    DiagonalJacobian,
    ExactJacobian,
    Jacobian,
    SecantJacobian,
    make_jacobian,
)
from .newton import SolveResult, newton_solve
from .pcr import STRUCTURES, pcr_solve, sequential_solve

__all__ = [
    "JACOBIANS",
    "STRUCTURES",
    "CallableJacobian",
    "ConstantJacobian",
    "DiagonalJacobian",
    "ExactJacobian",
    "Jacobian",
    "SecantJacobian",
    "SolveResult",
    "make_jacobian",
    "newton_solve",
    "pcr_solve",
    "sequential_solve",
]
