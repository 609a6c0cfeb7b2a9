"""pcr-diffusers pipelines, one per file in diffusers community-pipeline style (also usable with
`DiffusionPipeline.from_pretrained(..., custom_pipeline=<path to the file>)`)."""

from .pipeline_pcr_ddim import PCRDDIMPipeline
from .pipeline_pcr_ddpm import PCRDDPMPipeline

__all__ = ["PCRDDIMPipeline", "PCRDDPMPipeline"]
