"""PCRAutoPipeline: the parallel-in-time twin of any supported diffusers pipeline, from an instance or a folder.

    pcr = PCRAutoPipeline.from_pipe(pipe)             # shares `pipe`'s components
    pcr = PCRAutoPipeline.from_pretrained(folder)     # a folder saved by diffusers or by one of our pipelines

Like diffusers' `AutoPipelineForText2Image`, it is never instantiated: both methods return the twin's class.
"""

import importlib

from diffusers import DiffusionPipeline

from ..pipeline_utils import PCR_CLASS_KEY, PCRPipelineMixin

# The diffusers pipeline class -> our module and class. A twin matches its parent exactly: a subclass of a supported
# pipeline may change the denoising loop, which our twin would then not reproduce.
TWINS = {
    "DDPMPipeline": ("pipeline_pcr_ddpm", "PCRDDPMPipeline"),
    "DDIMPipeline": ("pipeline_pcr_ddim", "PCRDDIMPipeline"),
    "DiTPipeline": ("pipeline_pcr_dit", "PCRDiTPipeline"),
    "FluxPipeline": ("pipeline_pcr_flux", "PCRFluxPipeline"),
    "StableDiffusionPipeline": ("pipeline_pcr_stable_diffusion", "PCRStableDiffusionPipeline"),
    "StableDiffusionImg2ImgPipeline": ("pipeline_pcr_stable_diffusion_img2img", "PCRStableDiffusionImg2ImgPipeline"),
    "StableDiffusionInpaintPipeline": ("pipeline_pcr_stable_diffusion_inpaint", "PCRStableDiffusionInpaintPipeline"),
    "StableDiffusionXLPipeline": ("pipeline_pcr_stable_diffusion_xl", "PCRStableDiffusionXLPipeline"),
    "StableDiffusionXLImg2ImgPipeline": (
        "pipeline_pcr_stable_diffusion_xl_img2img",
        "PCRStableDiffusionXLImg2ImgPipeline",
    ),
    "StableDiffusion3Pipeline": ("pipeline_pcr_stable_diffusion_3", "PCRStableDiffusion3Pipeline"),
    "StableDiffusionControlNetPipeline": ("pipeline_pcr_controlnet", "PCRStableDiffusionControlNetPipeline"),
    "WanPipeline": ("pipeline_pcr_wan", "PCRWanPipeline"),
}


def twin_class(parent_name: str) -> type:
    """Our pipeline class standing in for the diffusers pipeline class named `parent_name`."""
    if parent_name not in TWINS:
        raise ValueError(
            f"pcr-diffusers has no parallel twin of {parent_name}; supported pipelines: {', '.join(sorted(TWINS))}."
        )
    module, name = TWINS[parent_name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


class PCRAutoPipeline:
    """The parallel twin of a diffusers pipeline (see the module docstring). The twin keeps its parent's `__call__`
    arguments and output, and adds `parallel`, `tolerance`, `jacobian`, `max_rounds`, `max_memory` and `.stats`."""

    def __init__(self, *args, **kwargs):
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated with `{type(self).__name__}.from_pipe(pipeline)` "
            f"or `{type(self).__name__}.from_pretrained(folder)`."
        )

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DiffusionPipeline:
        """The twin of `pipeline`, sharing its components (`kwargs` as in `DiffusionPipeline.from_pipe`: components
        to replace, `dtype`). A pcr-diffusers pipeline gets a new one of its own class."""
        if isinstance(pipeline, PCRPipelineMixin):
            return type(pipeline).from_pipe(pipeline, **kwargs)
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"`pipeline` must be a diffusers DiffusionPipeline, got {type(pipeline).__name__}.")
        return twin_class(type(pipeline).__name__).from_pipe(pipeline, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DiffusionPipeline:
        """The twin of the pipeline a folder (or a hub id already in the cache) holds: our class when one of our
        pipelines saved it, else the twin of the class its `model_index.json` names. `kwargs` as in
        `DiffusionPipeline.from_pretrained`."""
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path)
        if PCR_CLASS_KEY in config:
            name = config[PCR_CLASS_KEY]
            pipeline_class = next((twin_class(parent) for parent, (_, ours) in TWINS.items() if ours == name), None)
            if pipeline_class is None:
                raise ValueError(f"{pretrained_model_name_or_path} names an unknown pcr-diffusers pipeline, {name}.")
        else:
            pipeline_class = twin_class(config["_class_name"])
        return pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
