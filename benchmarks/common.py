"""Shared helpers for the benchmarks: timing that is fair to both sides, and the machine's name."""

import platform
import time

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def seconds(fn, repeats: int = 5, device: torch.device | str = "cpu", warmup: int = 1) -> float:
    """The fastest of `repeats` timed runs after `warmup` untimed ones: the least noisy estimate on a shared
    machine. A `torch.compile`d model with CUDA graphs records its graph on its first calls: warm it up 3 times."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def one_round_seconds(chain, latents: torch.Tensor, window: int, repeats: int, device, warmup: int = 1) -> float:
    """The seconds of one whole parallel round on `window` steps: the model call, the Jacobian, the two linear
    solves, the predictor for entering steps and the round's host read (`newton_solve` stopped after one round)."""
    from pcr_diffusers.core import newton_solve
    from pcr_diffusers.sampling import diffusion_jacobian, step_tolerances

    tol = step_tolerances(1e-3, torch.ones(len(chain), dtype=torch.float64, device=latents.device))

    def run():
        jacobian = diffusion_jacobian("auto")
        newton_solve(
            chain, latents, len(chain), jacobian=jacobian, tol=tol, window=window, max_iters=1, extend=chain.extend
        )

    return seconds(run, repeats, device, warmup)
