"""The text-to-image pipelines against diffusers' sequential pipelines, on tiny random components (tests/conftest.py).

Why float64: the comparison is only as sharp as the rounding floor under it. We call the model on window x 2 x
batch rows, the sequential loop on 2 x batch, and float32 results depend on the batch size; a random, untrained
model's chain can amplify that (to ~1e-3 of the samples' size for the unconditional tiny UNet of test_pipelines.py).
On these components, in float32, diffusers' own pipeline differs between batch 1 and batch 2 by up to 7e-7 of the
latents' max (10 steps, guidance 7.5; measured for SD, SDXL and SD3): two orders of magnitude under the 1e-4
bound, little margin for longer chains or other seeds. In float64 the floor is ~1e-15, and what remains is the solver's
tolerance (1e-5 here; the Euler and flow-matching steps compute in float32, in diffusers as here, which puts their
floor near 1e-7). The latents are compared (max abs difference <= 1e-4 of their max, as they enter the VAE) as well
as the images: a random tiny VAE squashes differences, so images alone would prove little.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from pcr_diffusers.pipelines import (
    PCRStableDiffusion3Pipeline,
    PCRStableDiffusionPipeline,
    PCRStableDiffusionXLPipeline,
)

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines"
# name: (diffusers pipeline, ours, fixture with the tiny components, our file, the denoiser's component name)
PIPELINES = {
    "sd": (
        StableDiffusionPipeline,
        PCRStableDiffusionPipeline,
        "tiny_sd_components",
        "pipeline_pcr_stable_diffusion.py",
        "unet",
    ),
    "sdxl": (
        StableDiffusionXLPipeline,
        PCRStableDiffusionXLPipeline,
        "tiny_sdxl_components",
        "pipeline_pcr_stable_diffusion_xl.py",
        "unet",
    ),
    "sd3": (
        StableDiffusion3Pipeline,
        PCRStableDiffusion3Pipeline,
        "tiny_sd3_components",
        "pipeline_pcr_stable_diffusion_3.py",
        "transformer",
    ),
}
STEPS = 10
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file: the tiny models gain nothing from more, and on a busy 2-core machine
    spinning threads made the file take 6 minutes instead of 7 seconds (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parent_pipeline(request, name, scheduler=None):
    """diffusers' pipeline on the shared tiny components; `scheduler(config)` replaces the default scheduler."""
    parent_class, _, fixture, _, _ = PIPELINES[name]
    components = dict(request.getfixturevalue(fixture))
    if scheduler is not None:
        components["scheduler"] = scheduler(components["scheduler"].config)
    pipe = parent_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pcr_pipeline(name, pipe):
    pcr = PIPELINES[name][1].from_pipe(pipe)
    pcr.set_progress_bar_config(disable=True)
    return pcr


def seeded(kwargs, seed=0):
    """Fresh generators (one per image when the case asks for a list) and global RNG, so every run draws alike."""
    torch.manual_seed(seed)  # SD3's stochastic flow-matching steps draw from the global RNG, in diffusers too
    kwargs = dict(kwargs)
    n = kwargs.pop("generators", 0)
    generator = (
        [torch.Generator().manual_seed(seed + i) for i in range(n)] if n else torch.Generator().manual_seed(seed)
    )
    if "latents" in kwargs:
        kwargs["latents"] = kwargs["latents"].clone()
    return dict(kwargs, generator=generator)


def record_decode_inputs(vae, monkeypatch) -> list:
    """Records what enters `vae.decode`: the final latents, divided by the VAE's scaling factor (plus its shift
    factor for SD3), so the latents of an `output_type="np"` run can be compared too."""
    seen = []
    decode = vae.decode

    def recording_decode(z, *args, **kwargs):
        seen.append(z)
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", recording_decode)
    return seen


class CountCalls:
    """Counts the calls of a module and the rows (batch size) of each."""

    def __init__(self, module):
        self.rows = []
        self._handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows.append(len(args[0] if args else kwargs["hidden_states"]))

    def remove(self):
        self._handle.remove()


def user_latents(batch_size):
    return torch.randn(batch_size, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def with_config(cls, **overrides):
    return lambda config: cls.from_config(config, **overrides)


PROMPTS = ["a cat", "a dog!"]
CASES = [
    ("sd", "ddim-guidance", None, dict(prompt="a cat", guidance_scale=7.5)),
    (
        "sd",
        "ddpm-no-guidance-batch-2",
        with_config(DDPMScheduler),
        dict(prompt=PROMPTS, guidance_scale=1.0, generators=2),
    ),
    (
        "sd",
        "euler-ancestral-negative-window-4",
        with_config(EulerAncestralDiscreteScheduler),
        dict(prompt=PROMPTS, negative_prompt=["dog", "cat"], guidance_scale=7.5, generators=2, parallel=4),
    ),
    (
        "sd",
        "ddim-eta-rescale-user-latents",
        None,
        dict(prompt="a cat", num_images_per_prompt=2, eta=0.5, guidance_rescale=0.7, latents=user_latents(2)),
    ),
    (
        "sd",
        "ddpm-custom-timesteps",
        with_config(DDPMScheduler),
        dict(prompt="a cat", timesteps=[999, 800, 600, 500, 300, 100, 50, 0]),
    ),
    (
        "sd",
        "pndm-sd15-batch-2-window-4",
        with_config(PNDMScheduler, skip_prk_steps=True),
        dict(prompt=PROMPTS, guidance_scale=7.5, generators=2, parallel=4),
    ),
    (
        "sd",
        "dpm++-2m-karras-window-3",
        with_config(DPMSolverMultistepScheduler, use_karras_sigmas=True),
        dict(prompt="a cat", guidance_scale=7.5, parallel=3),
    ),
    (
        "sd",
        "sde-dpm++-2m-batch-2",
        with_config(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"),
        dict(prompt=PROMPTS, guidance_scale=7.5, generators=2, parallel=4),
    ),
    ("sd", "lms-window-4", with_config(LMSDiscreteScheduler), dict(prompt="a cat", parallel=4)),
    ("sd", "deis-window-3", with_config(DEISMultistepScheduler), dict(prompt="a cat", parallel=3)),
    ("sdxl", "euler-guidance", None, dict(prompt="a cat", guidance_scale=7.5)),
    ("sdxl", "unipc-window-4", with_config(UniPCMultistepScheduler), dict(prompt="a cat", parallel=4)),
    ("sdxl", "euler-no-guidance-batch-2", None, dict(prompt=PROMPTS, guidance_scale=1.0, generators=2)),
    (
        "sdxl",
        "euler-ancestral-negative-sizes",
        with_config(EulerAncestralDiscreteScheduler),
        dict(
            prompt=PROMPTS,
            prompt_2=["cat", "dog"],
            negative_prompt="a cow",
            negative_original_size=(8, 8),
            negative_target_size=(16, 16),
            guidance_scale=7.5,
        ),
    ),
    (
        "sdxl",
        "ddim-user-latents-window-3",
        with_config(DDIMScheduler),
        dict(prompt="a dog", latents=user_latents(1), parallel=3),
    ),
    ("sd3", "guidance", None, dict(prompt="a cat", guidance_scale=7.5)),
    ("sd3", "no-guidance-batch-2", None, dict(prompt=PROMPTS, guidance_scale=1.0, generators=2)),
    (
        "sd3",
        "stochastic-negative",
        with_config(FlowMatchEulerDiscreteScheduler, stochastic_sampling=True),
        dict(prompt=PROMPTS, negative_prompt=["dog", "cat"], guidance_scale=7.5),
    ),
    ("sd3", "custom-sigmas", None, dict(prompt="a cat", sigmas=[1.0, 0.8, 0.6, 0.3, 0.1])),
    (
        "sd3",
        "unipc-flow-window-4",
        with_config(UniPCMultistepScheduler, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        dict(prompt="a cat", parallel=4),
    ),
    (
        "sd3",
        "dynamic-shift-user-latents-window-4",
        with_config(FlowMatchEulerDiscreteScheduler, use_dynamic_shifting=True),
        dict(prompt="a cat", num_images_per_prompt=2, latents=user_latents(2), parallel=4),
    ),
]


@pytest.mark.parametrize(
    "name, scheduler, kwargs", [c[:1] + c[2:] for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_matches_the_sequential_pipeline(request, monkeypatch, name, scheduler, kwargs):
    pipe = parent_pipeline(request, name, scheduler)
    decoded = record_decode_inputs(pipe.vae, monkeypatch)  # the VAE is shared with ours
    kwargs = dict(kwargs, num_inference_steps=STEPS, output_type="np")
    ref = pipe(**seeded({k: v for k, v in kwargs.items() if k != "parallel"})).images

    pcr = pcr_pipeline(name, pipe)
    calls = CountCalls(getattr(pcr, PIPELINES[name][4]))
    try:
        out = pcr(**seeded(kwargs), tolerance=TOLERANCE)
    finally:
        calls.remove()
    assert out.stats.converged
    ref_latents, latents = decoded
    assert (latents - ref_latents).abs().max() <= 1e-4 * ref_latents.abs().max()
    assert out.images.shape == ref.shape == (len(ref_latents), 16, 16, 3)
    assert np.abs(out.images - ref).max() <= 1e-4
    # one model call per round, on window x (2 with guidance) x batch rows
    window = min(kwargs.get("parallel", 64), pipe.num_timesteps)
    copies = 2 if kwargs.get("guidance_scale", 7.0) > 1 else 1  # the parents' defaults guide
    assert len(calls.rows) == out.stats.rounds
    assert calls.rows[0] == window * copies * len(ref_latents)


@pytest.mark.parametrize(
    "name, scheduler",
    [("sd", with_config(DDPMScheduler)), ("sdxl", with_config(EulerAncestralDiscreteScheduler)), ("sd3", None)],
    ids=["sd", "sdxl", "sd3"],
)
def test_parallel_one_is_the_sequential_loop(request, name, scheduler):
    """With a window of one step our loop makes the parent's model calls and steps: the same latents, bit for bit."""
    pipe = parent_pipeline(request, name, scheduler)
    kwargs = dict(prompt=PROMPTS, negative_prompt=["a cow", "cat"], num_inference_steps=STEPS, output_type="latent")
    ref = pipe(**seeded(kwargs)).images
    out = pcr_pipeline(name, pipe)(**seeded(kwargs), parallel=1)
    assert out.stats.rounds == STEPS and out.stats.model_evaluations == STEPS
    torch.testing.assert_close(out.images, ref, rtol=0, atol=0)


def test_sdxl_denoising_end_runs_the_first_steps(request):
    pipe = parent_pipeline(request, "sdxl")
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, denoising_end=0.6, output_type="latent")
    ref = pipe(**seeded(kwargs)).images
    pcr = pcr_pipeline("sdxl", pipe)
    out = pcr(**seeded(kwargs), tolerance=TOLERANCE)
    assert out.stats.converged and pcr.num_timesteps == pipe.num_timesteps == 6
    assert (out.images - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the parent stops after 6 of 10 steps: a run to the end differs
    full = pcr(**seeded(dict(kwargs, denoising_end=None)), tolerance=TOLERANCE).images
    assert (full - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("name", PIPELINES)
def test_from_pipe_shares_the_components(request, name):
    pipe = parent_pipeline(request, name)
    pcr = pcr_pipeline(name, pipe)
    assert isinstance(pcr, PIPELINES[name][1]) and isinstance(pcr, type(pipe))
    assert pcr.components.keys() == pipe.components.keys()
    for key, component in pipe.components.items():
        assert pcr.components[key] is component, key
    assert pcr.dtype == pipe.dtype == torch.float64


@pytest.mark.parametrize("name", PIPELINES)
def test_save_and_reload_with_custom_pipeline(request, name, tmp_path):
    pipe = parent_pipeline(request, name)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path,
        custom_pipeline=str(PIPELINE_DIR / PIPELINES[name][3]),
        trust_remote_code=True,
        torch_dtype=torch.float64,
        **{key: None for key, component in pipe.components.items() if component is None},  # as diffusers documents
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == PIPELINES[name][1].__name__
    kwargs = dict(prompt="a cat", num_inference_steps=4)
    images, *_ = loaded(**seeded(kwargs), output_type="np", return_dict=False)
    assert loaded.stats.converged
    np.testing.assert_allclose(images, pcr_pipeline(name, pipe)(**seeded(kwargs), output_type="np").images, atol=1e-6)
    pil = loaded(**seeded(kwargs)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_stable_diffusion_outputs(request):
    pcr = pcr_pipeline("sd", parent_pipeline(request, "sd"))
    images, nsfw = pcr("a cat", num_inference_steps=4, output_type="pt", return_dict=False)  # the parent's tuple
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert nsfw is None and pcr.stats.model_evaluations >= 4


class ModelCalled(Exception):
    pass


def forbid_model_calls(pipe, monkeypatch):
    """Every model component raises `ModelCalled` when called: the tests below must fail before any model call."""

    def forbidden(*args, **kwargs):
        raise ModelCalled

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            monkeypatch.setattr(component, "forward", forbidden)


BAD_INPUT = [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"parallel": 0}, "parallel"),
    ({"tolerance": 0.0}, "tolerance"),
    ({"jacobian": "newton"}, "jacobian"),
    ({"max_rounds": 0}, "max_rounds"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),  # the parent's
    ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, "ip_adapter_image_embeds"),
    ({"prompt": None}, "prompt_embeds"),  # the parent's check_inputs
    ({"height": 15, "width": 16}, "divisible by"),  # the parent's check_inputs
    ({"prompt": PROMPTS, "generator": [torch.Generator()]}, "generators"),
    ({"scheduler": KDPM2DiscreteScheduler}, "from_config"),
    ({"scheduler": HeunDiscreteScheduler}, "HeunDiscreteScheduler"),
]
BAD_INPUT_OF = {
    "sd": [({"callback_steps": 0}, "callback_steps"), ({"guidence_scale": 3}, "guidence")],
    "sdxl": [({"prompt_2": 5}, "prompt_2"), ({"guidence_scale": 3}, "guidence")],
    "sd3": [({"skip_guidance_layers": [0]}, "skip_guidance_layers"), ({"max_sequence_length": 600}, "512")],
}


@pytest.mark.parametrize(
    "name, kwargs, match",
    [(name, kwargs, match) for name in PIPELINES for kwargs, match in BAD_INPUT + BAD_INPUT_OF[name]],
    ids=[f"{name}-{match}" for name in PIPELINES for _, match in BAD_INPUT + BAD_INPUT_OF[name]],
)
def test_bad_input_fails_before_any_model_call(request, monkeypatch, name, kwargs, match):
    kwargs = dict(kwargs)
    scheduler = kwargs.pop("scheduler", None)
    pcr = pcr_pipeline(name, parent_pipeline(request, name, scheduler and with_config(scheduler)))
    forbid_model_calls(pcr, monkeypatch)
    with pytest.raises(ValueError, match=match):
        pcr(**{"prompt": "a cat", "num_inference_steps": STEPS, **kwargs})


def test_the_legacy_callback_sees_the_accepted_latents(request):
    """The parent's deprecated `callback(step, t, latents)`, run by the parent's own loop after the solve."""
    pipe = parent_pipeline(request, "sd")
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="latent", callback_steps=2)
    seen = {"parent": [], "ours": []}
    for name, call in (("parent", pipe), ("ours", pcr_pipeline("sd", pipe))):
        record = lambda i, t, latents, seen=seen[name]: seen.append((i, int(t), latents.clone()))  # noqa: E731
        extra = {} if name == "parent" else {"parallel": 4, "tolerance": TOLERANCE}
        call(**seeded(kwargs), callback=record, **extra)
    assert [(i, t) for i, t, _ in seen["ours"]] == [(i, t) for i, t, _ in seen["parent"]] and len(seen["ours"]) > 1
    for (_, _, ours), (_, _, theirs) in zip(seen["ours"], seen["parent"], strict=True):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_guidance_embedding_unets_get_a_row_per_model_row(request):
    """An LCM-style UNet (`time_cond_proj_dim`, a guidance embedding) under classifier-free guidance, in windows."""
    components = dict(request.getfixturevalue("tiny_sd_components"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(components["unet"].config, time_cond_proj_dim=8)
    components["unet"] = unet.double().eval()
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="latent", guidance_scale=5.0)
    ref = pipe(**seeded(kwargs)).images
    out = pcr_pipeline("sd", pipe)(**seeded(kwargs), parallel=4, tolerance=TOLERANCE)
    assert out.stats.converged and out.stats.rounds < STEPS
    assert (out.images - ref).abs().max() <= 1e-4 * ref.abs().max()
