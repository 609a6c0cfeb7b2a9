"""`LMSDiscreteScheduler` (linear multistep on the probability-flow ODE) with batched steps."""

import numbers

import torch
from diffusers import LMSDiscreteScheduler

from .scheduling_euler_pcr import _SigmaMixin
from .scheduling_pcr import StepHistory

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class PCRLMSDiscreteScheduler(_SigmaMixin, LMSDiscreteScheduler):
    """LMS with `batch_step`; everything else is `LMSDiscreteScheduler`'s.

    A step reads the ODE derivatives `d = (x - x0) / sigma` of itself and the steps before it:

        x' = x + (((c_0 d_l + c_1 d_{l-1}) + c_2 d_{l-2}) + c_3 d_{l-3}),

    the base's Python `sum`, with `c_k = get_lms_coefficient(p, i, k)` for `p = min(i + 1, order)` at position i
    (the base's own quadrature, tabulated once per `set_timesteps` and order). As in the base, `p` counts from the
    start of the schedule while its list of derivatives starts at the chain's first step: a chain that starts
    mid-schedule (`set_begin_index`) drops the terms before it, which the history's zeros there do exactly
    (`total + c * 0 == total`), so no plan depends on the start. `order` is the base step's keyword argument
    (default 4), here a step keyword of the chain, up to 4 (`history_size + 1`). Supports every sigma schedule and
    timestep spacing and the prediction types `epsilon`, `v_prediction` and `sample`.
    """

    history_size = 3  # the default order 4 reads the derivatives of the 3 steps before

    def _check_config(self):
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)

    def _check_order(self, order) -> None:
        allowed = range(1, self.history_size + 2)
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in allowed:
            raise self._unsupported("the step's `order`", order, allowed)

    def _step_table(self):
        """The sigma table the Euler twins use (`_SigmaMixin`): the base's `sigmas[i]` arithmetic at each position."""
        self._check_config()
        return self._sigma_table()

    def _lms_table(self, order: int, device: torch.device | str) -> torch.Tensor:
        """`(order, N)` float64: row k holds `get_lms_coefficient(min(i + 1, order), i, k)` at each position i (0
        where `k >= i + 1`), built once per `set_timesteps`, order and device (`order` quadratures per position, as
        the base's steps compute them)."""
        self.step_table("cpu")  # the cache of this `set_timesteps`
        tables, key = self._pcr_tables, ("lms", order)
        if key not in tables:
            coefficients = torch.zeros(order, len(self.timesteps), dtype=torch.float64)
            for i in range(len(self.timesteps)):
                effective = min(i + 1, order)  # the base's order at step index i
                for k in range(effective):
                    coefficients[k, i] = self.get_lms_coefficient(effective, i, k)
            tables[key] = {torch.device("cpu"): coefficients}
        device = torch.device(device)
        if device not in tables[key]:
            tables[key][device] = tables[key][torch.device("cpu")].to(device)
        return tables[key][device]

    def noise_mask(self, order: int = 4):
        self._check_order(order)
        return [False] * len(self.timesteps)

    def batch_convert_model_output(self, model_output, indices, sample, start=0):
        """The ODE derivative `(sample - x0) / sigma` the base appends to its `derivatives`."""
        model_output, _ = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample, start)
        return (sample - self._to_x0(model_output, sample, c)) / c["sigma"]

    def batch_step(
        self, model_output, indices, sample, noise=None, *, history: StepHistory, start: int = 0, order: int = 4
    ):
        """`LMSDiscreteScheduler.step(..., order=order)` for the positions `indices` of a chain that starts at
        `start`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the unscaled state.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (these steps draw none); accepted for a uniform signature.
            history: the derivatives of the `history_size` steps before each (`StepHistory`).
            start: the chain's first position (the history holds zeros before it).
            order: as in `LMSDiscreteScheduler.step`, 1 to 4.
        """
        self._check_order(order)
        derivatives = [self.batch_convert_model_output(model_output, indices, sample, start)]
        derivatives += [history.outputs[:, k] for k in range(order - 1)]  # lag k + 1, zeros before the chain
        coefficients = self._lms_table(order, indices.device)[:, indices].to(sample.dtype)  # (order, n)
        total = 0  # the base's `sum`
        for coefficient, derivative in zip(coefficients, derivatives, strict=True):
            total = total + coefficient.reshape(-1, *([1] * (sample.ndim - 1))) * derivative
        return sample + total
