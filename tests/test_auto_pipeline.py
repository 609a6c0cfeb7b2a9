"""PCRAutoPipeline: the twin of every supported pipeline, from an instance or a saved folder; clear errors else."""

import pytest
import torch
from conftest import tiny_controlnet_components, tiny_wan_components
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DiffusionPipeline,
    DiTPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
)
from test_dit import dit_pipeline

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.pipeline_utils import parent_pipeline_class
from pcr_diffusers.pipelines import PCRAutoPipeline
from pcr_diffusers.pipelines.auto_pipeline import TWINS, twin_class

TEXT_TO_IMAGE = {  # parent -> the fixture with its tiny components
    StableDiffusionPipeline: "tiny_sd_components",
    StableDiffusionImg2ImgPipeline: "tiny_sd_components",
    StableDiffusionInpaintPipeline: "tiny_sd_components",
    StableDiffusionXLPipeline: "tiny_sdxl_components",
    StableDiffusionXLImg2ImgPipeline: "tiny_sdxl_components",
    StableDiffusion3Pipeline: "tiny_sd3_components",
    FluxPipeline: "tiny_flux_components",
}


BUILT = {  # parent -> the builder of its tiny components
    StableDiffusionControlNetPipeline: tiny_controlnet_components,
    WanPipeline: tiny_wan_components,
}


def parent(request, parent_class):
    if parent_class is DiTPipeline:
        return dit_pipeline()
    if parent_class in (DDPMPipeline, DDIMPipeline):
        return load_digits_pipeline("ddpm" if parent_class is DDPMPipeline else "ddim")
    if parent_class in BUILT:
        return parent_class(**BUILT[parent_class](request.getfixturevalue("tmp_path")))
    return parent_class(**request.getfixturevalue(TEXT_TO_IMAGE[parent_class]))


PARENTS = [DDPMPipeline, DDIMPipeline, DiTPipeline, *TEXT_TO_IMAGE, *BUILT]


def test_every_twin_stands_in_for_the_parent_it_is_registered_for():
    assert {parent_class.__name__ for parent_class in PARENTS} == set(TWINS)  # and each is tested below
    for parent_name in TWINS:
        assert parent_pipeline_class(twin_class(parent_name)).__name__ == parent_name


@pytest.mark.parametrize("parent_class", PARENTS, ids=lambda c: c.__name__)
def test_from_pipe_returns_the_twin_sharing_the_components(request, parent_class):
    pipe = parent(request, parent_class)
    pcr = PCRAutoPipeline.from_pipe(pipe)
    assert parent_pipeline_class(type(pcr)) is parent_class and type(pcr) is not parent_class
    modules = {name: value for name, value in pipe.components.items() if isinstance(value, torch.nn.Module)}
    assert modules and all(pcr.components[name] is module for name, module in modules.items())
    assert type(PCRAutoPipeline.from_pipe(pcr)) is type(pcr)  # a twin gives a twin of its own class


@pytest.mark.parametrize("parent_class", [DDPMPipeline, StableDiffusionPipeline], ids=lambda c: c.__name__)
def test_from_pretrained_loads_the_twin_of_a_parent_folder_and_of_our_folder(request, tmp_path, parent_class):
    pipe = parent(request, parent_class)
    pipe.save_pretrained(tmp_path / "parent")
    pcr = PCRAutoPipeline.from_pretrained(tmp_path / "parent")
    assert parent_pipeline_class(type(pcr)) is parent_class
    pcr.save_pretrained(tmp_path / "ours")
    assert type(PCRAutoPipeline.from_pretrained(tmp_path / "ours")) is type(pcr)
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "ours")) is parent_class


def test_the_twin_from_pipe_samples_like_the_parent():
    pipe = load_digits_pipeline("ddim")
    pipe.set_progress_bar_config(disable=True)
    pcr = PCRAutoPipeline.from_pipe(pipe)
    kwargs = dict(batch_size=1, num_inference_steps=10, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    out = pcr(generator=torch.Generator().manual_seed(0), tolerance=1e-5, **kwargs)
    assert out.stats.converged and abs(out.images - ref).max() <= 1e-4


def test_unsupported_pipelines_and_bad_arguments_get_clear_errors(tmp_path):
    class MyDDPMPipeline(DDPMPipeline):  # may change the loop: not silently treated as its parent
        pass

    pipe = load_digits_pipeline("ddpm")
    with pytest.raises(ValueError, match="no parallel twin of MyDDPMPipeline; supported pipelines: DDIMPipeline"):
        PCRAutoPipeline.from_pipe(MyDDPMPipeline(pipe.unet, pipe.scheduler))
    with pytest.raises(TypeError, match="`pipeline` must be a diffusers DiffusionPipeline, got UNet2DModel"):
        PCRAutoPipeline.from_pipe(pipe.unet)
    with pytest.raises(OSError, match="from_pipe"):
        PCRAutoPipeline()
    pipe.save_pretrained(tmp_path)
    index = tmp_path / "model_index.json"
    index.write_text(index.read_text().replace('"DDPMPipeline"', '"KandinskyPipeline"'))
    with pytest.raises(ValueError, match="no parallel twin of KandinskyPipeline"):
        PCRAutoPipeline.from_pretrained(tmp_path)
