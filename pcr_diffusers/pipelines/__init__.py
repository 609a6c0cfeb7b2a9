"""pcr-diffusers pipelines, one per file in diffusers community-pipeline style (also usable with
`DiffusionPipeline.from_pretrained(..., custom_pipeline=<path to the file>)`)."""

from .auto_pipeline import PCRAutoPipeline
from .pipeline_pcr_ddim import PCRDDIMPipeline
from .pipeline_pcr_ddpm import PCRDDPMPipeline
from .pipeline_pcr_stable_diffusion import PCRStableDiffusionPipeline
from .pipeline_pcr_stable_diffusion_3 import PCRStableDiffusion3Pipeline
from .pipeline_pcr_stable_diffusion_xl import PCRStableDiffusionXLPipeline

__all__ = [
    "PCRAutoPipeline",
    "PCRDDIMPipeline",
    "PCRDDPMPipeline",
    "PCRStableDiffusion3Pipeline",
    "PCRStableDiffusionPipeline",
    "PCRStableDiffusionXLPipeline",
]
