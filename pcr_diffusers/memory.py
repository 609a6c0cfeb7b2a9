"""Memory-aware windows: how much memory a round of the parallel sampler needs, and the largest window that fits.

A round evaluates the model on `window x batch` rows at once, so its memory grows linearly with the window. The
window is fitted to a budget from one probe: the peak memory of a single step's evaluation (model call and the
Jacobian's vector-Jacobian products), measured with `PeakMemory`, plus the solver's own arrays.
"""

import logging
import os
import weakref

import torch
import torch.distributed as dist
from accelerate.utils import convert_file_size_to_int
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)

# The solver's arrays, in units of one step's latents (B, C, H, W): per step of the chain, the states, the noise
# and the secant's two history buffers; per step of the window, the model's input and output, the step's output,
# two Jacobian coefficients, the residual, the update and PCR's two work arrays. Calibrated against measured peaks
# in tests/test_memory.py, with room to spare.
SOLVER_ARRAYS_PER_STEP = 6
WINDOW_ARRAYS_PER_STEP = 16
SAFETY = 0.9  # use at most this fraction of the budget


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by torch ops while active, freed when their last tensor dies."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.now = self.peak = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), tensor.device)
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out


class PeakMemory:
    """Context manager: `.peak` is the most memory that tensors created inside it held at once, in bytes.

    On CUDA it reads the caching allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated at
    entry; elsewhere it tracks every storage that torch ops create (a `TorchDispatchMode`), which costs some speed.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self.peak = self._mode.peak
        return False


def memory_budget(device: torch.device | str, max_memory: int | str | None) -> int:
    """The bytes sampling may use: `max_memory` (bytes, or a string such as `"2GB"`, `"512MiB"`), capped on CUDA
    by the free device memory; without it, the free CUDA memory or, on the CPU, the available physical memory."""
    device = torch.device(device)
    budget = None
    if max_memory is not None:
        budget = convert_file_size_to_int(max_memory) if isinstance(max_memory, str) else int(max_memory)
        if budget <= 0:
            raise ValueError(f"`max_memory` must be a positive size, got {max_memory!r}.")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free if budget is None else min(budget, free)
    if budget is None:
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError) as error:
            raise ValueError("Pass `max_memory` (e.g. '4GB'): this system does not report its free memory.") from error
    return budget


def agreed(chain, value: float, device, op=dist.ReduceOp.MIN) -> float:
    """`value` reduced with `op` over all processes of a sharded model (every process must slide the same window);
    `value` itself without sharding."""
    group = getattr(chain.model_fn, "group", None)
    if group is None:
        return value
    reduced = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(reduced, op=op, group=group)
    return reduced.item()


def agreed_window(chain, window: int, device) -> int:
    """The smallest `window` of all processes of a sharded model; `window` itself without sharding."""
    return int(agreed(chain, window, device))


def fit_window(chain, latents: torch.Tensor, requested: int | str, max_memory: int | str | None) -> int:
    """The largest window (at most `requested`, or the chain's length for `"auto"`) whose estimated peak memory
    fits the budget; logs when it shrinks the window. Runs one probe step (one model call, batch B)."""
    num_steps = len(chain)
    wanted = num_steps if requested == "auto" else min(requested, num_steps)
    step_bytes = latents.numel() * torch.finfo(latents.dtype).bits // 8
    with PeakMemory(latents.device) as probe:
        chain.linearize(torch.zeros(1, dtype=torch.long, device=latents.device), latents.unsqueeze(0))
    per_window_step = probe.peak + WINDOW_ARRAYS_PER_STEP * step_bytes
    budget = SAFETY * memory_budget(latents.device, max_memory) - SOLVER_ARRAYS_PER_STEP * num_steps * step_bytes
    window = max(1, min(wanted, int(budget // per_window_step)))
    window = agreed_window(chain, window, latents.device)
    if budget < per_window_step:
        logger.warning(
            f"The memory budget ({budget / 2**20:.1f} MiB for the window after the solver's arrays) is below one "
            f"step's estimated need ({per_window_step / 2**20:.1f} MiB); sampling one step per round."
        )
    elif window < wanted:
        logger.info(
            f"Parallel window shrunk from {wanted} to {window} steps to fit the memory budget "
            f"(about {per_window_step / 2**20:.1f} MiB per step of the window)."
        )
    return window
