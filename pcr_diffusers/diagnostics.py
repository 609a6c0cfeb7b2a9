"""Counting what crosses between host and device: on a GPU every host read of a tensor value blocks until the device
has caught up, and every tensor made from host data is a copy to the device. A parallel round is meant to read the
device once (its summary: how many steps it accepted, its largest residual, whether all was finite).

- `HostTraffic` counts, on any device (the CPU included), the calls that would do either: reads (`.item()`,
  `bool()`, `.tolist()`, `.cpu()`, ...), tensors made from host data (`torch.tensor(...)`) and `.to()` calls that
  name a device.
- `count_cuda_syncs` counts the synchronisations CUDA itself reports (`torch.cuda.set_sync_debug_mode`).
"""

import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset(
    {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__format__"}
)
HOST_DATA = frozenset({"tensor", "as_tensor", "from_numpy"})


class HostTraffic(TorchFunctionMode):
    """Context manager: `.reads` and `.copies` count the torch calls inside it that read tensor values on the host,
    and that make tensors from host data or move tensors to a named device."""

    def __init__(self):
        super().__init__()
        self.reads = self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads += 1
        elif name in HOST_DATA or (name == "to" and ("device" in kwargs or any(map(_names_a_device, args[1:])))):
            self.copies += 1
        return func(*args, **kwargs)


def _names_a_device(value) -> bool:
    return isinstance(value, (torch.device, str)) or (isinstance(value, torch.Tensor) and value.device.type != "cpu")


@contextmanager
def count_cuda_syncs():
    """Counts the synchronising CUDA calls inside the block, as `torch.cuda.set_sync_debug_mode("warn")` reports
    them; the count is `.syncs` of the yielded object after the block."""
    counter = SimpleNamespace(syncs=0)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counter.syncs = sum("synchroniz" in str(warning.message) for warning in caught)
