"""pcr-diffusers: parallel-in-time diffusion sampling and deep layer stacks (Newton + parallel cyclic reduction).

`import pcr_diffusers` loads only the torch core; the diffusers parts load on first use.
"""

from .core import SolveResult, newton_solve, pcr_solve, sequential_solve

__version__ = "0.1.0"

__all__ = [
    "SolveResult",
    "load_digits_pipeline",
    "load_guided_digits_pipeline",
    "newton_solve",
    "pcr_solve",
    "sequential_solve",
]


def __getattr__(name):
    if name == "load_digits_pipeline":
        from .digits import load_digits_pipeline

        return load_digits_pipeline
    if name == "load_guided_digits_pipeline":
        from .digits_guided import load_guided_digits_pipeline

        return load_guided_digits_pipeline
    raise AttributeError(f"module 'pcr_diffusers' has no attribute {name!r}")
