"""The image-to-image and inpainting pipelines against diffusers' sequential pipelines, on tiny random components
(tests/conftest.py, float64: see tests/test_text_to_image.py for why).

`strength` < 1 starts the chain mid-schedule, so every case here runs the scheduler twins from a later start index:
single-step ones (DDIM, DDPM, Euler, Euler ancestral), the multistep ones with their warm-up counted from the chain's
first step (DPM-Solver++ 2M, UniPC, DEIS, PNDM with and without PRK steps, LMS). Inpainting with a 4-channel UNet
puts the known region back after every step, inside the chain's step; a 9-channel UNet reads the mask and the masked
image beside the latents. Latents are compared (`output_type="latent"`) within 1e-6 of their largest value; the
solver's `tolerance=1e-7` leaves that margin to the Euler-type steps, which compute in float32 in diffusers as here.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from test_text_to_image import (  # noqa: F401 (one_thread: an autouse fixture, for this file too)
    PROMPTS,
    CountCalls,
    forbid_model_calls,
    one_thread,
    seeded,
    user_latents,
    with_config,
)

from pcr_diffusers.pipelines.pipeline_pcr_stable_diffusion_img2img import PCRStableDiffusionImg2ImgPipeline
from pcr_diffusers.pipelines.pipeline_pcr_stable_diffusion_inpaint import PCRStableDiffusionInpaintPipeline
from pcr_diffusers.pipelines.pipeline_pcr_stable_diffusion_xl_img2img import PCRStableDiffusionXLImg2ImgPipeline

STEPS = 10
TOLERANCE = 1e-7
OUR_OPTIONS = ["parallel", "tolerance", "jacobian", "max_rounds", "max_memory"]


@pytest.fixture(scope="module")
def tiny_sd_inpaint_components(tiny_sd_components):
    """The tiny SD components with a 9-channel inpainting UNet (latents, mask, masked image's latents)."""
    torch.manual_seed(0)
    config = {**tiny_sd_components["unet"].config, "in_channels": 9}
    return {**tiny_sd_components, "unet": UNet2DConditionModel.from_config(config).double().eval()}


@pytest.fixture(scope="module")
def tiny_sdxl_img2img_components(tiny_sdxl_components):
    """The tiny SDXL components with a VAE of their own: SDXL's img2img parent casts a `force_upcast` VAE to float32
    and back when it encodes the image, which would round the weights of the session's shared VAE."""
    return {**tiny_sdxl_components, "vae": copy.deepcopy(tiny_sdxl_components["vae"])}


# name: (diffusers pipeline, ours, fixture with the tiny components)
TWINS = {
    "img2img": (StableDiffusionImg2ImgPipeline, PCRStableDiffusionImg2ImgPipeline, "tiny_sd_components"),
    "inpaint-4": (StableDiffusionInpaintPipeline, PCRStableDiffusionInpaintPipeline, "tiny_sd_components"),
    "inpaint-9": (StableDiffusionInpaintPipeline, PCRStableDiffusionInpaintPipeline, "tiny_sd_inpaint_components"),
    "sdxl-img2img": (
        StableDiffusionXLImg2ImgPipeline,
        PCRStableDiffusionXLImg2ImgPipeline,
        "tiny_sdxl_img2img_components",
    ),
}
SCHEDULERS = {  # each from the components' scheduler config (SD 1.5's betas and "leading" spacing)
    "ddim": with_config(DDIMScheduler),
    "ddpm": with_config(DDPMScheduler),
    "euler": with_config(EulerDiscreteScheduler),
    "euler-a": with_config(EulerAncestralDiscreteScheduler),
    "dpm++2m": with_config(DPMSolverMultistepScheduler),
    "sde-dpm++2m": with_config(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"),
    "unipc": with_config(UniPCMultistepScheduler),
    "deis": with_config(DEISMultistepScheduler),
    "lms": with_config(LMSDiscreteScheduler),
    "pndm": with_config(PNDMScheduler, skip_prk_steps=True),
    "pndm-prk": with_config(PNDMScheduler),
    "heun": with_config(HeunDiscreteScheduler),  # not supported
}
GUIDANCE = {"cfg": dict(guidance_scale=7.5, negative_prompt=["a cow", "dog"]), "no-cfg": dict(guidance_scale=1.0)}
IMAGE = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # in [0, 1], as the parents take it
MASK = torch.zeros(2, 1, 16, 16)  # 1 where the image is repainted
MASK[0, :, 4:12, 2:10] = 1
MASK[1, :, 0:8, 6:16] = 1


def pipelines(request, name, scheduler=None):
    """diffusers' pipeline on the shared tiny components (with `SCHEDULERS[scheduler]`), and ours from it."""
    parent_class, twin_class, fixture = TWINS[name]
    components = dict(request.getfixturevalue(fixture))
    if scheduler is not None:
        components["scheduler"] = SCHEDULERS[scheduler](components["scheduler"].config)
    parent = parent_class(**components)
    parent.set_progress_bar_config(disable=True)
    twin = twin_class.from_pipe(parent)
    twin.set_progress_bar_config(disable=True)
    return parent, twin


def inputs(name, guidance="cfg", **kwargs):
    """A batch of two prompts with one generator each, the images (and masks), as `seeded` takes them."""
    images = dict(image=IMAGE, mask_image=MASK) if name.startswith("inpaint") else dict(image=IMAGE)
    return {**dict(prompt=PROMPTS, num_inference_steps=STEPS, generators=2), **images, **GUIDANCE[guidance], **kwargs}


REFINED = user_latents(2)  # SDXL's refiner takes a base's latents as its `image`
CASES = [
    *[
        ("img2img", scheduler, guidance, dict(strength=strength))
        for scheduler in ("ddim", "euler", "dpm++2m", "unipc", "pndm")
        for strength in (0.3, 0.8)
        for guidance in ("cfg", "no-cfg")
    ],
    *[
        ("img2img", scheduler, "cfg", dict(strength=0.8))
        for scheduler in ("ddpm", "euler-a", "sde-dpm++2m", "deis", "lms", "pndm-prk")
    ],
    ("img2img", "ddim", "cfg", dict(strength=0.3, eta=0.5)),
    (
        "img2img",
        "euler",
        "cfg",
        dict(strength=0.8, prompt="a cat", negative_prompt="a cow", image=IMAGE[:1], num_images_per_prompt=2),
    ),
    *[
        (name, scheduler, "cfg" if strength == 0.8 else "no-cfg", dict(strength=strength))
        for name in ("inpaint-4", "inpaint-9")
        for scheduler in ("ddim", "euler", "dpm++2m", "unipc")
        for strength in (0.3, 0.8)
    ],
    ("inpaint-4", "euler-a", "cfg", dict(strength=1.0)),
    ("inpaint-4", "pndm", "cfg", dict(strength=0.8, latents=user_latents(2))),
    ("inpaint-9", "ddim", "no-cfg", dict(strength=1.0, eta=0.5)),
    *[
        ("sdxl-img2img", scheduler, guidance, dict(strength=strength))
        for scheduler in ("euler", "ddim", "dpm++2m", "unipc")
        for strength, guidance in ((0.3, "no-cfg"), (0.8, "cfg"))
    ],
    ("sdxl-img2img", "euler-a", "cfg", dict(strength=0.8, denoising_end=0.5, guidance_rescale=0.7)),
    ("sdxl-img2img", "euler", "cfg", dict(denoising_start=0.6, image=REFINED)),
    ("sdxl-img2img", "dpm++2m", "no-cfg", dict(denoising_start=0.3, denoising_end=0.7, image=REFINED)),
]


def case_id(case):
    name, scheduler, guidance, kwargs = case
    shown = {key: value for key, value in kwargs.items() if isinstance(value, (int, float))}
    return "-".join([name, scheduler, guidance, *(f"{key}={value}" for key, value in shown.items())])


@pytest.mark.parametrize("name, scheduler, guidance, kwargs", CASES, ids=[case_id(case) for case in CASES])
def test_matches_the_sequential_pipeline(request, name, scheduler, guidance, kwargs):
    parent, twin = pipelines(request, name, scheduler)
    kwargs = dict(inputs(name, guidance, **kwargs), output_type="latent")
    expected = parent(**seeded(kwargs)).images
    window = parent.num_timesteps - 1  # smaller than the chain: the window slides
    calls = CountCalls(twin.unet)
    try:
        out = twin(**seeded(kwargs), parallel=window, tolerance=TOLERANCE)
    finally:
        calls.remove()
    assert out.stats.converged and twin.num_timesteps == parent.num_timesteps
    assert out.images.shape == expected.shape == (2, 4, 8, 8)
    assert (out.images - expected).abs().max() <= 1e-6 * expected.abs().max()
    # one UNet call per round, on window x (2 with guidance) x batch rows
    assert len(calls.rows) == out.stats.rounds
    assert calls.rows[0] == window * (2 if guidance == "cfg" else 1) * len(expected)


@pytest.mark.parametrize(
    "name, scheduler, kwargs",
    [
        ("img2img", "dpm++2m", dict(strength=0.8)),
        ("img2img", "pndm-prk", dict(strength=0.3)),
        ("inpaint-4", "euler", dict(strength=0.8)),
        ("inpaint-4", "pndm", dict(strength=1.0)),
        ("inpaint-9", "euler-a", dict(strength=0.8)),
        ("sdxl-img2img", "euler-a", dict(strength=0.8, denoising_end=0.5)),
    ],
    ids=["img2img-dpm++2m", "img2img-pndm-prk", "inpaint-4-euler", "inpaint-4-pndm", "inpaint-9-euler-a", "sdxl"],
)
def test_parallel_one_is_the_sequential_loop(request, name, scheduler, kwargs):
    """With a window of one step our loop makes the parent's model calls and steps (and the known region's blend),
    from the same start index: the same latents, bit for bit."""
    parent, twin = pipelines(request, name, scheduler)
    kwargs = dict(inputs(name, **kwargs), output_type="latent")
    expected = parent(**seeded(kwargs)).images
    out = twin(**seeded(kwargs), parallel=1)
    assert out.stats.rounds == out.stats.model_evaluations == twin.num_timesteps == parent.num_timesteps
    torch.testing.assert_close(out.images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", TWINS)
def test_newton_rounds_accept_several_steps(request, name):
    """At a looser tolerance each round accepts several steps on their residuals (which, for inpainting, include
    the known region's blend) and the result stays within the tolerance of the sequential one."""
    parent, twin = pipelines(request, name)
    kwargs = dict(inputs(name, num_inference_steps=20, strength=0.8), output_type="latent")
    expected = parent(**seeded(kwargs)).images
    out = twin(**seeded(kwargs), parallel=8, tolerance=1e-4)
    assert out.stats.converged and out.stats.rounds < twin.num_timesteps == 16
    assert (out.images - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("name", ["img2img", "inpaint-4", "sdxl-img2img"])
def test_keeps_the_parent_call_arguments_then_adds_ours(name):
    parent_class, twin_class, _ = TWINS[name]
    theirs = inspect.signature(parent_class.__call__).parameters
    ours = inspect.signature(twin_class.__call__).parameters
    shown = [(p.name, p.kind, p.default) for p in ours.values() if p.name in theirs]
    assert shown == [(p.name, p.kind, p.default) for p in theirs.values()]
    assert [name for name, p in ours.items() if p.kind is inspect.Parameter.KEYWORD_ONLY] == OUR_OPTIONS


@pytest.mark.parametrize("name", ["img2img", "inpaint-9", "sdxl-img2img"])
def test_a_saved_pipeline_reloads_as_ours_and_as_the_parent(request, tmp_path, name):
    parent, twin = pipelines(request, name)
    twin.save_pretrained(tmp_path)
    unset = {key: None for key, component in parent.components.items() if component is None}
    loaded = {cls: cls.from_pretrained(tmp_path, torch_dtype=torch.float64, **unset) for cls in TWINS[name][:2]}
    for cls, pipe in loaded.items():
        assert type(pipe) is cls
        pipe.set_progress_bar_config(disable=True)
    ours, theirs = loaded[TWINS[name][1]], loaded[TWINS[name][0]]
    kwargs = dict(inputs(name, strength=0.8), output_type="np")
    expected = theirs(**seeded(kwargs)).images
    images, *_ = ours(**seeded(kwargs), tolerance=TOLERANCE, return_dict=False)  # the parent's tuple
    assert ours.stats.converged and images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)


BAD_INPUT = [
    ({"strength": -0.1}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"strength": 0.05}, "leave no denoising step"),  # int(10 * 0.05) = 0 steps
    ({"parallel": 0}, "parallel"),
    ({"tolerance": 0.0}, "tolerance"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),  # the parent's
    ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, "ip_adapter_image_embeds"),
    ({"generator": [torch.Generator()]}, "generators"),
    ({"scheduler": "heun"}, "HeunDiscreteScheduler"),
]
BAD_INPUT_OF = {
    "img2img": [({"callback_steps": 0}, "callback_steps")],
    "inpaint-4": [({"padding_mask_crop": 2}, "PIL image")],  # the parent's check_inputs
    "inpaint-9": [({"height": 15}, "divisible by")],
    "sdxl-img2img": [
        ({"denoising_start": 0.7, "denoising_end": 0.5}, "denoising_start"),
        ({"strength": 0.3, "denoising_end": 0.5}, "denoising_end"),  # the last 3 timesteps are all under 500
    ],
}


@pytest.mark.parametrize(
    "name, kwargs, match",
    [(name, kwargs, match) for name in TWINS for kwargs, match in BAD_INPUT + BAD_INPUT_OF[name]],
    ids=[f"{name}-{match}" for name in TWINS for _, match in BAD_INPUT + BAD_INPUT_OF[name]],
)
def test_bad_input_fails_before_any_model_call(request, monkeypatch, name, kwargs, match):
    kwargs = dict(kwargs)
    _, twin = pipelines(request, name, kwargs.pop("scheduler", None))
    forbid_model_calls(twin, monkeypatch)
    with pytest.raises(ValueError, match=match):
        twin(**{**seeded(inputs(name, strength=0.8)), **kwargs})


@pytest.mark.parametrize("name", ["inpaint-4", "inpaint-9"])
def test_inpainting_refuses_a_strength_that_keeps_no_step_as_the_parent(request, monkeypatch, name):
    """int(10 * 0.05) = 0 steps: the inpainting parent raises, also with PNDM, whose schedule has one more timestep
    than steps and so keeps one to run (found by diffusers' test_stable_diffusion_inpaint_strength_zero_test)."""
    parent, twin = pipelines(request, name, "pndm")
    kwargs = inputs(name, strength=0.05)
    with pytest.raises(ValueError, match="number of pipeline"):
        parent(**seeded(kwargs))
    with pytest.raises(ValueError, match="number of pipeline"):  # the parent's own check, in our call
        twin(**seeded(kwargs))
