"""pcr-diffusers pipelines, one per file in diffusers community-pipeline style (also usable with
`DiffusionPipeline.from_pretrained(..., custom_pipeline=<path to the file>)`)."""

from .auto_pipeline import PCRAutoPipeline
from .pipeline_pcr_controlnet import PCRStableDiffusionControlNetPipeline
from .pipeline_pcr_ddim import PCRDDIMPipeline
from .pipeline_pcr_ddpm import PCRDDPMPipeline
from .pipeline_pcr_dit import PCRDiTPipeline
from .pipeline_pcr_flux import PCRFluxPipeline
from .pipeline_pcr_stable_diffusion import PCRStableDiffusionPipeline
from .pipeline_pcr_stable_diffusion_3 import PCRStableDiffusion3Pipeline
from .pipeline_pcr_stable_diffusion_img2img import PCRStableDiffusionImg2ImgPipeline
from .pipeline_pcr_stable_diffusion_inpaint import PCRStableDiffusionInpaintPipeline
from .pipeline_pcr_stable_diffusion_xl import PCRStableDiffusionXLPipeline
from .pipeline_pcr_stable_diffusion_xl_img2img import PCRStableDiffusionXLImg2ImgPipeline
from .pipeline_pcr_wan import PCRWanPipeline

__all__ = [
    "PCRAutoPipeline",
    "PCRDDIMPipeline",
    "PCRDDPMPipeline",
    "PCRDiTPipeline",
    "PCRFluxPipeline",
    "PCRStableDiffusion3Pipeline",
    "PCRStableDiffusionControlNetPipeline",
    "PCRStableDiffusionImg2ImgPipeline",
    "PCRStableDiffusionInpaintPipeline",
    "PCRStableDiffusionPipeline",
    "PCRStableDiffusionXLImg2ImgPipeline",
    "PCRStableDiffusionXLPipeline",
    "PCRWanPipeline",
]
