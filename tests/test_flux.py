"""PCRFluxPipeline against diffusers' FluxPipeline on tiny random components (tests/conftest.py): packed latents
`(B, seq, C)`, position ids shared by every row of a call, the guidance embedding, true classifier-free guidance.

Float64, as in tests/test_text_to_image.py. The flow-matching step rounds its sample to float32 (in diffusers as
here), so a chain's rounding floor is float32's; at `tolerance=1e-7` the latents still match within 1e-6 of their
size. The packed latents (`output_type="latent"`) are compared: a random tiny VAE squashes differences.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_flux_pipeline_components
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    MagCacheConfig,
    UniPCMultistepScheduler,
)
from test_text_to_image import BAD_INPUT as TEXT_TO_IMAGE_BAD_INPUT
from test_text_to_image import (  # noqa: F401 (one_thread: an autouse fixture, for this file too)
    PROMPTS,
    forbid_model_calls,
    one_thread,
    seeded,
    with_config,
)

from pcr_diffusers.pipelines.pipeline_pcr_flux import PCRFluxPipeline
from pcr_diffusers.text_to_image import GuidedModel

STEPS = 10
TOLERANCE = 1e-7
# 16x16 images: 8x8 latents with 4 channels, packed in 2x2 patches to 16 tokens of 16 channels
CALL = dict(prompt=PROMPTS, height=16, width=16, num_inference_steps=STEPS, max_sequence_length=8)
BASE = dict(CALL, generators=2)  # `seeded` makes them


@pytest.fixture(scope="module")
def tiny_flux_components_without_guidance_embeds(tmp_path_factory):
    return tiny_flux_pipeline_components(tmp_path_factory.mktemp("flux"), torch.float64, guidance_embeds=False)


def parent_pipeline(request, guidance_embeds=True, scheduler=None) -> FluxPipeline:
    """diffusers' pipeline on the shared tiny components; `scheduler(config)` replaces Flux's scheduler."""
    fixture = "tiny_flux_components" if guidance_embeds else "tiny_flux_components_without_guidance_embeds"
    components = dict(request.getfixturevalue(fixture))
    if scheduler is not None:
        components["scheduler"] = scheduler(components["scheduler"].config)
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pcr_pipeline(pipe) -> PCRFluxPipeline:
    pcr = PCRFluxPipeline.from_pipe(pipe)
    pcr.set_progress_bar_config(disable=True)
    return pcr


def embeds(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def passed_embeds(tokens=5, negative_tokens=5):
    """Embeddings passed in place of two prompts and two negative prompts: T5's `(2, tokens, 32)`, pooled CLIP's
    `(2, 32)`."""
    return dict(
        prompt=None,
        prompt_embeds=embeds(2, tokens, 32, seed=1),
        pooled_prompt_embeds=embeds(2, 32, seed=2),
        negative_prompt_embeds=embeds(2, negative_tokens, 32, seed=3),
        negative_pooled_prompt_embeds=embeds(2, 32, seed=4),
    )


class RecordCalls:
    """Records every call of the transformer: its rows and the shapes of the position ids it gets."""

    def __init__(self, transformer):
        self.rows, self.ids = [], []
        self._handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows.append(len(kwargs["hidden_states"]))
        self.ids.append((tuple(kwargs["img_ids"].shape), tuple(kwargs["txt_ids"].shape)))

    def remove(self):
        self._handle.remove()


FLOW_SIGMAS = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
CASES = [  # id, guidance embedding, scheduler, arguments over BASE
    ("batch-2", True, None, {}),
    ("32x16-guidance-5", True, None, dict(height=32, width=16, guidance_scale=5.0)),  # 32 tokens: another shift
    ("no-guidance-embeds-2-images-per-prompt", False, None, dict(prompt="a cat", num_images_per_prompt=2)),
    ("true-cfg", True, None, dict(negative_prompt=["a cow", "cat"], true_cfg_scale=4.0)),
    (  # the parent's negative call broadcasts one negative prompt over the batch
        "true-cfg-one-negative-no-guidance-embeds",
        False,
        None,
        dict(negative_prompt="a cow", true_cfg_scale=2.5),
    ),
    (
        "true-cfg-prompt-embeds",
        True,
        None,
        dict(passed_embeds(), true_cfg_scale=3.0),
    ),
    ("user-latents", True, None, dict(latents=embeds(2, 16, 16, seed=7))),
    ("window-4", True, None, dict(parallel=4)),
    (
        "stochastic-window-4",
        True,
        with_config(FlowMatchEulerDiscreteScheduler, stochastic_sampling=True),
        dict(parallel=4),
    ),
    (
        "unipc-flow-window-4",
        True,
        with_config(UniPCMultistepScheduler, **FLOW_SIGMAS, flow_shift=3.0),
        dict(parallel=4),
    ),
    (
        "dpm++-flow-dynamic-shift-window-4",
        True,
        with_config(
            DPMSolverMultistepScheduler, **FLOW_SIGMAS, use_dynamic_shifting=True, time_shift_type="exponential"
        ),
        dict(parallel=4),
    ),
    ("memory-fitted-window", True, None, dict(parallel="auto", max_memory="50MB")),
]


@pytest.mark.parametrize("guidance_embeds, scheduler, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_flux_pipeline(request, guidance_embeds, scheduler, kwargs):
    pipe = parent_pipeline(request, guidance_embeds, scheduler)
    kwargs = {**BASE, **kwargs, "output_type": "latent"}
    ref = pipe(**seeded({k: v for k, v in kwargs.items() if k not in ("parallel", "max_memory")})).images

    pcr = pcr_pipeline(pipe)
    calls = RecordCalls(pcr.transformer)
    try:
        out = pcr(**seeded(kwargs), tolerance=TOLERANCE)
    finally:
        calls.remove()
    assert out.stats.converged
    batch = kwargs["generators"]
    assert out.images.shape == ref.shape == (batch, kwargs["height"] * kwargs["width"] // 16, 16)
    assert (out.images - ref).abs().max() <= 1e-6 * ref.abs().max()
    # one transformer call per round, on up to window x (2 with true CFG) x batch rows, with 2-D position ids
    copies = 2 if kwargs.get("true_cfg_scale", 1.0) > 1 else 1
    assert len(calls.rows) == out.stats.rounds and all(rows % (copies * batch) == 0 for rows in calls.rows)
    if kwargs.get("parallel") != "auto":  # "auto" runs its first rounds at growing windows, then keeps one
        assert max(calls.rows) == min(out.stats.window, STEPS) * copies * batch
    text_tokens = kwargs["prompt_embeds"].shape[1] if "prompt_embeds" in kwargs else kwargs["max_sequence_length"]
    assert set(calls.ids) == {((ref.shape[1], 3), (text_tokens, 3))}


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["guidance-embeds", "no-guidance-embeds"])
def test_parallel_one_is_the_sequential_loop(request, guidance_embeds):
    """With a window of one step our loop makes the parent's transformer calls (timestep `t / 1000` in the
    latents' dtype, the guidance embedding) and steps: the same latents, bit for bit."""
    pipe = parent_pipeline(request, guidance_embeds)
    kwargs = dict(BASE, output_type="latent")
    ref = pipe(**seeded(kwargs)).images
    out = pcr_pipeline(pipe)(**seeded(kwargs), parallel=1)
    assert out.stats.rounds == STEPS and out.stats.model_evaluations == STEPS
    torch.testing.assert_close(out.images, ref, rtol=0, atol=0)


def test_guidance_scale_reaches_the_guidance_embedding(request):
    pcr = pcr_pipeline(parent_pipeline(request))
    kwargs = dict(BASE, output_type="latent")
    low = pcr(**seeded(kwargs), guidance_scale=1.0).images
    high = pcr(**seeded(kwargs), guidance_scale=5.0).images
    assert (high - low).abs().max() > 1e-3 * low.abs().max()


def test_save_pretrained_reloads_as_pcr_and_as_flux(request, tmp_path):
    pipe = parent_pipeline(request)
    pcr_pipeline(pipe).save_pretrained(tmp_path)
    loaded = PCRFluxPipeline.from_pretrained(tmp_path, dtype=torch.float64)
    parent = FluxPipeline.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded) is PCRFluxPipeline and type(parent) is FluxPipeline
    kwargs = dict(BASE, num_inference_steps=4, output_type="np")
    ref = pipe(**seeded(kwargs)).images
    for reloaded in (loaded, parent):
        reloaded.set_progress_bar_config(disable=True)
    (images,) = loaded(**seeded(kwargs), return_dict=False)  # the parent's tuple
    assert loaded.stats.converged and images.shape == ref.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(parent(**seeded(kwargs)).images, ref)


def test_shared_conditioning_must_be_in_the_conditioning():
    with pytest.raises(ValueError, match="img_ids"):
        GuidedModel(lambda x, t, **c: x, {"txt_ids": torch.zeros(3, 3)}, 1, None, shared=("img_ids", "txt_ids"))


# the other pipelines' bad input, but for a height that FluxPipeline rounds down with a warning
BAD_INPUT = [case for case in TEXT_TO_IMAGE_BAD_INPUT if case[1] != "divisible by"] + [
    ({"negative_ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, "negative_ip_adapter_image_embeds.*IP-Adapter"),
    ({"max_sequence_length": 600}, "512"),  # the parent's check_inputs
    (dict(passed_embeds(negative_tokens=6), true_cfg_scale=2.0), "same shape"),  # the parent's check
    (  # ours: one batched call needs the prompt's and the negative prompt's T5 tokens of the same length
        dict(passed_embeds(), negative_prompt_embeds=None, negative_prompt="a cow", true_cfg_scale=2.0),
        "same length",
    ),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUT, ids=[match for _, match in BAD_INPUT])
def test_bad_input_fails_before_any_model_call(request, monkeypatch, kwargs, match):
    kwargs = dict(kwargs)
    scheduler = kwargs.pop("scheduler", None)
    pcr = pcr_pipeline(parent_pipeline(request, scheduler=scheduler and with_config(scheduler)))
    forbid_model_calls(pcr, monkeypatch)
    with pytest.raises(ValueError, match=match):
        pcr(**{**CALL, **kwargs})


def test_negative_prompts_of_another_batch_fail_before_the_transformer(request, monkeypatch):
    pcr = pcr_pipeline(parent_pipeline(request))
    monkeypatch.setattr(pcr.transformer, "forward", lambda *args, **kwargs: pytest.fail("transformer called"))
    with pytest.raises(ValueError, match="negative prompt in one batched call, so their .* same shape"):
        pcr(**seeded(BASE), negative_prompt=["a", "b", "c"], true_cfg_scale=2.0)


def test_a_step_cache_on_the_transformer_fails_before_any_model_call(request, monkeypatch):
    """As PCRWanPipeline: a cache reuses the previous step's activations, which parallel sampling evaluates out of
    order. A MagCache (diffusers' test_mag_cache_inference) used to run silently, 1.6e-2 away from the parent."""
    components = dict(request.getfixturevalue("tiny_flux_components"))
    transformer = FluxTransformer2DModel.from_config(components["transformer"].config)  # the cache hooks stay on it
    transformer.enable_cache(MagCacheConfig(num_inference_steps=STEPS, mag_ratios=torch.ones(STEPS)))
    pcr = pcr_pipeline(FluxPipeline(**{**components, "transformer": transformer}))
    forbid_model_calls(pcr, monkeypatch)
    with pytest.raises(ValueError, match="step cache"):
        pcr(**seeded(BASE))
