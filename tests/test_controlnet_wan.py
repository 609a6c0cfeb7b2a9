"""PCRStableDiffusionControlNetPipeline and PCRWanPipeline against diffusers' sequential pipelines, on tiny random
float64 components built in code (tests/conftest.py; why float64: tests/test_text_to_image.py).

The latents (`output_type="latent"`) are compared within 1e-6 of their largest value, at `tolerance=1e-7`. What
remains at that tolerance is the schedulers' own rounding: DDIM's twin and diffusers' DDIM round differently (~5e-9),
the flow-matching steps compute in float32 in both, and Wan's parent keeps its UniPC latents in float32 while our
chain is float64 for a float64 transformer (~2e-7).
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_controlnet_components, tiny_wan_components
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from test_conventions import test_pipelines_keep_the_parent_call_arguments_then_add_ours as check_call_arguments
from test_text_to_image import CountCalls, ModelCalled, forbid_model_calls, one_thread, seeded  # noqa: F401

from pcr_diffusers.pipelines.pipeline_pcr_controlnet import PCRStableDiffusionControlNetPipeline
from pcr_diffusers.pipelines.pipeline_pcr_wan import PCRWanPipeline

STEPS = 10
TOLERANCE = 1e-7
PROMPTS = ["a cat", "a dog!"]
WAN_SIZE = dict(height=32, width=32, num_frames=9, max_sequence_length=16)  # latents (B, 16, 3, 4, 4)
# `one_thread`, imported above, is an autouse fixture: one intra-op thread for this file too


@pytest.fixture(scope="module")
def controlnet_components(tmp_path_factory):
    return tiny_controlnet_components(tmp_path_factory.mktemp("controlnet-tokenizer"), torch.float64)


@pytest.fixture(scope="module")
def wan_components(tmp_path_factory):
    return tiny_wan_components(tmp_path_factory.mktemp("wan-tokenizer"), torch.float64)


def control_images(n: int) -> torch.Tensor:
    """`n` random control images in [0, 1], `(n, 3, 16, 16)`."""
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def build(parent_class, components, scheduler=None, **config):
    """The parent pipeline on the shared components (`scheduler` replaces theirs) and our twin sharing them."""
    components = dict(components, **({} if scheduler is None else {"scheduler": scheduler}))
    pipe = parent_class(**components, **config)
    ours = {StableDiffusionControlNetPipeline: PCRStableDiffusionControlNetPipeline, WanPipeline: PCRWanPipeline}
    pcr = ours[parent_class].from_pipe(pipe)
    for p in (pipe, pcr):
        p.set_progress_bar_config(disable=True)
    return pipe, pcr


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, relative: float = 1e-6) -> None:
    assert ours.shape == theirs.shape
    error = (ours.double() - theirs.double()).abs().max() / theirs.abs().max()
    assert error <= relative, f"largest difference {error:.2e} of the latents' size"


def latents_of(output) -> torch.Tensor:
    return output.images if hasattr(output, "images") else output.frames


def check_matches_parent(pipe, pcr, kwargs, counted: dict, rows_per_step: dict):
    """Runs both with the same seeds; our latents within 1e-6 of the parent's, one call of each model per round on
    `window x rows_per_step[name]` rows in the first round."""
    kwargs = dict(kwargs, num_inference_steps=STEPS, output_type="latent")
    window = min(kwargs.pop("parallel", 64), STEPS)
    ref = latents_of(pipe(**seeded(kwargs)))
    calls = {name: CountCalls(module) for name, module in counted.items()}
    try:
        out = pcr(**seeded(kwargs), parallel=window, tolerance=TOLERANCE)
    finally:
        for count in calls.values():
            count.remove()
    assert out.stats.converged and out.stats.window == window
    assert_close_relative(latents_of(out), ref)
    for name, count in calls.items():
        assert len(count.rows) == out.stats.rounds, name
        assert count.rows[0] == window * rows_per_step[name], name
    return out


# ControlNet


CONTROLNET_CASES = {
    "guidance-negative-per-image-control-window-4": dict(
        prompt=PROMPTS,
        negative_prompt=["dog", "cat"],
        image=control_images(2),
        controlnet_conditioning_scale=0.5,
        generators=2,
        parallel=4,
    ),
    "no-guidance-user-latents-scale-1.5-start-end-window-3": dict(
        prompt="a cat",
        image=control_images(1),
        guidance_scale=1.0,
        latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
        controlnet_conditioning_scale=1.5,
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        parallel=3,
    ),
    "guess-mode-ddpm-batch-2-guidance-end": dict(
        prompt=PROMPTS,
        image=control_images(1),
        guess_mode=True,
        control_guidance_end=[0.6],
        generators=2,
        parallel=4,
    ),
    "guess-mode-no-guidance-euler-ancestral": dict(
        prompt="a cat", num_images_per_prompt=2, image=control_images(1), guess_mode=True, guidance_scale=1.0
    ),
}
CONTROLNET_SCHEDULERS = {
    "guess-mode-ddpm-batch-2-guidance-end": DDPMScheduler,
    "guess-mode-no-guidance-euler-ancestral": EulerAncestralDiscreteScheduler,
}


@pytest.mark.parametrize("case", CONTROLNET_CASES)
def test_controlnet_matches_the_sequential_pipeline(controlnet_components, case):
    kwargs = CONTROLNET_CASES[case]
    scheduler = CONTROLNET_SCHEDULERS.get(case)
    scheduler = scheduler and scheduler.from_config(controlnet_components["scheduler"].config)
    pipe, pcr = build(StableDiffusionControlNetPipeline, controlnet_components, scheduler)
    batch = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else kwargs.get("num_images_per_prompt", 1)
    guided = kwargs.get("guidance_scale", 7.5) > 1
    unet_rows = (2 if guided else 1) * batch
    controlnet_rows = batch if kwargs.get("guess_mode") else unet_rows  # guess mode: the conditional rows only
    counted = {"unet": pipe.unet, "controlnet": pipe.controlnet}
    check_matches_parent(pipe, pcr, kwargs, counted, {"unet": unet_rows, "controlnet": controlnet_rows})


def test_controlnet_scale_guidance_window_and_guess_mode_change_the_result(controlnet_components):
    """So the cases above could fail: the control image matters, and so do each of the ControlNet arguments."""
    pipe, _ = build(StableDiffusionControlNetPipeline, controlnet_components)
    kwargs = dict(prompt="a cat", image=control_images(1), num_inference_steps=STEPS, output_type="latent")
    ref = pipe(**seeded(kwargs)).images
    for change in (
        dict(controlnet_conditioning_scale=0.0),
        dict(controlnet_conditioning_scale=1.5),
        dict(control_guidance_start=0.2, control_guidance_end=0.7),
        dict(guess_mode=True),
    ):
        other = pipe(**seeded(dict(kwargs, **change))).images
        assert (other - ref).abs().max() > 1e-3 * ref.abs().max(), change


def test_controlnet_parallel_one_is_the_sequential_loop(controlnet_components):
    """With a window of one step our loop makes the parent's model calls and steps: the same latents, bit for bit."""
    scheduler = DDPMScheduler.from_config(controlnet_components["scheduler"].config)
    pipe, pcr = build(StableDiffusionControlNetPipeline, controlnet_components, scheduler)
    kwargs = dict(
        prompt=PROMPTS,
        negative_prompt=["a cow", "cat"],
        image=control_images(2),
        control_guidance_start=0.3,
        num_inference_steps=STEPS,
        output_type="latent",
        generators=2,
    )
    ref = pipe(**seeded(kwargs)).images
    out = pcr(**seeded(kwargs), parallel=1)
    assert out.stats.rounds == STEPS and out.stats.model_evaluations == STEPS
    torch.testing.assert_close(out.images, ref, rtol=0, atol=0)


# Wan


def user_video_latents():
    return torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def embeddings(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


WAN_CASES = {
    "unipc-guidance-negative-batch-2-window-4": (
        None,
        {},
        dict(prompt=PROMPTS, negative_prompt=["dog", "cat"], generators=2, parallel=4),
    ),
    "unipc-no-guidance-user-latents": (
        None,
        {},
        dict(prompt="a cat", guidance_scale=1.0, latents=user_video_latents()),
    ),
    "flow-euler-guidance-batch-2-window-3": (
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        {},
        dict(prompt="a cat", num_videos_per_prompt=2, negative_prompt="a dog", generators=2, parallel=3),
    ),
    "flow-euler-stochastic-embeddings": (
        FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True),
        {},
        dict(prompt_embeds=embeddings(1), negative_prompt_embeds=embeddings(2)),
    ),
    "unipc-expand-timesteps-window-4": (None, dict(expand_timesteps=True), dict(prompt="a cat", parallel=4)),
}


@pytest.mark.parametrize("case", WAN_CASES)
def test_wan_matches_the_sequential_pipeline(wan_components, case):
    scheduler, config, kwargs = WAN_CASES[case]
    pipe, pcr = build(WanPipeline, wan_components, scheduler, **config)
    batch = 2 if "generators" in kwargs else 1
    rows = (2 if kwargs.get("guidance_scale", 5.0) > 1 else 1) * batch  # the parent's default guides
    out = check_matches_parent(
        pipe, pcr, dict(kwargs, **WAN_SIZE), {"transformer": pipe.transformer}, {"transformer": rows}
    )
    assert out.frames.shape == (batch, 16, 3, 4, 4)


def test_wan_parallel_one_is_the_sequential_loop(wan_components):
    """A window of one step: the parent's steps. The parent calls the transformer for the prompt and the negative
    prompt separately, we in one call: equal up to float64 rounding."""
    pipe, pcr = build(WanPipeline, wan_components, FlowMatchEulerDiscreteScheduler(shift=3.0))
    kwargs = dict(prompt=PROMPTS, negative_prompt=["a cow", "cat"], num_inference_steps=STEPS, output_type="latent")
    ref = pipe(**seeded(dict(kwargs, **WAN_SIZE, generators=2))).frames
    out = pcr(**seeded(dict(kwargs, **WAN_SIZE, generators=2)), parallel=1)
    assert out.stats.rounds == STEPS and out.stats.model_evaluations == STEPS
    assert_close_relative(out.frames, ref, 1e-13)


# Both


PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines"


def test_save_and_reload(controlnet_components, wan_components, tmp_path):
    """A saved twin is a folder of its parent: our class reloads it as itself, the parent as the parent, diffusers'
    community-pipeline loader as ours; ours and the parent then generate alike (decoded too)."""
    cases = [
        (StableDiffusionControlNetPipeline, controlnet_components, dict(image=control_images(1)), (1, 16, 16, 3)),
        (WanPipeline, wan_components, WAN_SIZE, (1, 9, 32, 32, 3)),
    ]
    for parent_class, components, inputs, shape in cases:
        folder = tmp_path / parent_class.__name__
        _, pcr = build(parent_class, components)
        pcr.save_pretrained(folder)
        none = {name: None for name, component in components.items() if component is None}
        loaded = [cls.from_pretrained(folder, torch_dtype=torch.float64, **none) for cls in (type(pcr), parent_class)]
        assert [type(p) for p in loaded] == [type(pcr), parent_class]
        community = DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=str(PIPELINE_DIR / Path(inspect.getfile(type(pcr))).name), trust_remote_code=True
        )
        assert type(community).__name__ == type(pcr).__name__
        kwargs = dict(inputs, prompt="a cat", num_inference_steps=4, output_type="np")
        for p in loaded:
            p.set_progress_bar_config(disable=True)
        ours, theirs = (latents_of(p(**seeded(kwargs))) for p in loaded)
        assert ours.shape == theirs.shape == shape and np.abs(ours - theirs).max() <= 1e-5
        assert loaded[0].stats.converged


@pytest.mark.parametrize(
    "parent, twin",
    [(StableDiffusionControlNetPipeline, PCRStableDiffusionControlNetPipeline), (WanPipeline, PCRWanPipeline)],
)
def test_twins_keep_the_parent_call_arguments_then_add_ours(parent, twin):
    check_call_arguments(parent, twin)


BAD_INPUT = [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"parallel": 0}, "parallel"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),  # the parent's
    ({"prompt": PROMPTS, "generator": [torch.Generator()]}, "generators"),
]
CONTROLNET_BAD_INPUT = [
    ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, "ip_adapter_image_embeds"),
    ({"callback_steps": 0}, "callback_steps"),  # the parent's check
    ({"controlnet_conditioning_scale": [1.0, 2.0]}, "controlnet_conditioning_scale"),  # the parent's check
    ({"control_guidance_start": 0.8, "control_guidance_end": 0.2}, "control guidance start"),  # the parent's check
    ({"image": None}, "image must be passed"),  # the parent's check
    ({"multi_controlnet": True}, "one `ControlNetModel`"),
]
WAN_BAD_INPUT = [
    ({"height": 24}, "divisible by 16"),  # the parent's check
    ({"guidance_scale_2": 3.0}, "guidance_scale_2"),  # the parent's check
    ({"boundary_ratio": 0.5}, "boundary_ratio"),
    ({"cache": True}, "step cache"),
]


BAD_INPUT_CASES = [("controlnet", *case) for case in BAD_INPUT + CONTROLNET_BAD_INPUT] + [
    ("wan", *case) for case in BAD_INPUT + WAN_BAD_INPUT
]


@pytest.mark.parametrize("name, kwargs, match", BAD_INPUT_CASES, ids=[f"{c[0]}-{c[2]}" for c in BAD_INPUT_CASES])
def test_bad_input_fails_before_any_model_call(
    controlnet_components, wan_components, monkeypatch, name, kwargs, match
):
    kwargs = dict(
        kwargs, prompt=kwargs.get("prompt", "a cat"), num_inference_steps=kwargs.get("num_inference_steps", 4)
    )
    if name == "controlnet":
        components = dict(controlnet_components)
        if kwargs.pop("multi_controlnet", False):
            components["controlnet"] = [components["controlnet"]] * 2
        _, pcr = build(StableDiffusionControlNetPipeline, components)
        kwargs.setdefault("image", control_images(1))
    else:
        components = dict(wan_components)
        if kwargs.pop("cache", False):  # on a transformer of its own: the cache hooks stay on it
            components["transformer"] = WanTransformer3DModel.from_config(components["transformer"].config)
            components["transformer"].enable_cache(FirstBlockCacheConfig(threshold=0.1))
        config = {"boundary_ratio": kwargs.pop("boundary_ratio")} if "boundary_ratio" in kwargs else {}
        _, pcr = build(WanPipeline, components, **config)
        kwargs = dict(WAN_SIZE, **kwargs)
    forbid_model_calls(pcr, monkeypatch)
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            pcr(**kwargs)
    except ModelCalled:
        pytest.fail("a model was called before the error")
