"""Diffusers schedulers that step many timesteps in one vectorised call, built from a user's scheduler."""

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .scheduling_ddim_pcr import PCRDDIMScheduler
from .scheduling_ddpm_pcr import PCRDDPMScheduler
from .scheduling_deis_multistep_pcr import PCRDEISMultistepScheduler
from .scheduling_dpmsolver_multistep_pcr import PCRDPMSolverMultistepScheduler
from .scheduling_euler_pcr import PCREulerAncestralDiscreteScheduler, PCREulerDiscreteScheduler
from .scheduling_flow_match_euler_pcr import PCRFlowMatchEulerDiscreteScheduler
from .scheduling_lms_discrete_pcr import PCRLMSDiscreteScheduler
from .scheduling_pcr import PCRSchedulerMixin
from .scheduling_pndm_pcr import PCRPNDMScheduler
from .scheduling_unipc_multistep_pcr import PCRUniPCMultistepScheduler

PCR_SCHEDULERS = {
    DDPMScheduler: PCRDDPMScheduler,
    DDIMScheduler: PCRDDIMScheduler,
    EulerDiscreteScheduler: PCREulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler: PCREulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler: PCRFlowMatchEulerDiscreteScheduler,
    DPMSolverMultistepScheduler: PCRDPMSolverMultistepScheduler,
    PNDMScheduler: PCRPNDMScheduler,
    LMSDiscreteScheduler: PCRLMSDiscreteScheduler,
    UniPCMultistepScheduler: PCRUniPCMultistepScheduler,
    DEISMultistepScheduler: PCRDEISMultistepScheduler,
}


class PCRScheduler:
    """Entry point: `PCRScheduler.from_scheduler(pipe.scheduler)` returns the PCR twin of a supported scheduler."""

    @staticmethod
    def from_scheduler(scheduler) -> PCRSchedulerMixin:
        """The PCR scheduler with `scheduler`'s config; a clear error for schedulers we do not support.

        Only the exact supported classes are accepted (a subclass may change `step` in ways we would not follow).
        """
        pcr_class = next((c for base, c in PCR_SCHEDULERS.items() if type(scheduler) in (base, c)), None)
        if pcr_class is None:
            supported = ", ".join(base.__name__ for base in PCR_SCHEDULERS)
            base = next((base for base in PCR_SCHEDULERS if isinstance(scheduler, base)), None)
            if base is not None:  # a subclass may change `step` in ways the batched step would not follow
                raise ValueError(
                    f"Parallel sampling does not support {type(scheduler).__name__}, a subclass of {base.__name__}: "
                    f"the batched step reproduces {base.__name__}'s own `step` only. Use {base.__name__} itself, "
                    f"e.g. `pipe.scheduler = {base.__name__}.from_config(pipe.scheduler.config)`."
                )
            raise ValueError(
                f"Parallel sampling does not support {type(scheduler).__name__}. Supported schedulers: {supported}. "
                "Convert yours in one line, e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
            )
        return pcr_class.from_scheduler(scheduler)


__all__ = [
    "PCR_SCHEDULERS",
    "PCRDDIMScheduler",
    "PCRDDPMScheduler",
    "PCRDEISMultistepScheduler",
    "PCRDPMSolverMultistepScheduler",
    "PCREulerAncestralDiscreteScheduler",
    "PCREulerDiscreteScheduler",
    "PCRFlowMatchEulerDiscreteScheduler",
    "PCRLMSDiscreteScheduler",
    "PCRPNDMScheduler",
    "PCRScheduler",
    "PCRSchedulerMixin",
    "PCRUniPCMultistepScheduler",
]
