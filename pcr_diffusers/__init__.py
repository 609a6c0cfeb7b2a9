"""pcr-diffusers: parallel-in-time diffusion sampling and deep layer stacks (Newton + parallel cyclic reduction)."""

from .core import SolveResult, newton_solve, pcr_solve, sequential_solve

__version__ = "0.1.0"

__all__ = ["SolveResult", "newton_solve", "pcr_solve", "sequential_solve"]
