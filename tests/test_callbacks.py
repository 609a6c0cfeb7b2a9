"""`callback_on_step_end` in every text-to-image twin: called after the solve, in step order, as the parent calls it.

Each twin's callback sees what its parent's sees, step by step: the same `i` (the parent loop's index, from 0 also
where img2img starts mid-schedule) and `t`, the latents after step i (the solver's accepted states: within 1e-6 of the
parent's at `tolerance=1e-7`, bit for bit with a window of one step) and the parent's other callback tensors. A
callback that would steer the parent's later steps is an error. Tiny float64 components (tests/conftest.py).
"""

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback
from test_controlnet_wan import controlnet_components, wan_components  # noqa: F401 (fixtures)
from test_img2img_inpaint import tiny_sdxl_img2img_components  # noqa: F401 (a fixture)
from test_text_to_image import PROMPTS, forbid_model_calls, one_thread, seeded  # noqa: F401 (one_thread: autouse)

from pcr_diffusers.pipelines import PCRAutoPipeline

STEPS = 10
TOLERANCE = 1e-7
NEGATIVE = dict(negative_prompt=["a cow", "dog"])
IMAGE = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
MASK = torch.zeros(2, 1, 16, 16)
MASK[:, :, 4:12, 2:10] = 1


# name: (diffusers pipeline, fixture, scheduler class (None: the components'), the call's arguments)
TWINS = {
    "sd": (StableDiffusionPipeline, "tiny_sd_components", DDPMScheduler, dict(prompt=PROMPTS, **NEGATIVE)),
    "sd-img2img": (
        StableDiffusionImg2ImgPipeline,
        "tiny_sd_components",
        DPMSolverMultistepScheduler,
        dict(prompt=PROMPTS, image=IMAGE, strength=0.8, **NEGATIVE),
    ),
    "sd-inpaint": (
        StableDiffusionInpaintPipeline,
        "tiny_sd_components",
        EulerDiscreteScheduler,
        dict(prompt=PROMPTS, image=IMAGE, mask_image=MASK, strength=0.8, **NEGATIVE),
    ),
    "sd-controlnet": (
        StableDiffusionControlNetPipeline,
        "controlnet_components",
        DDPMScheduler,
        dict(prompt=PROMPTS, image=IMAGE, control_guidance_start=0.3, **NEGATIVE),
    ),
    "sdxl": (StableDiffusionXLPipeline, "tiny_sdxl_components", EulerAncestralDiscreteScheduler, dict(prompt=PROMPTS)),
    "sdxl-img2img": (
        StableDiffusionXLImg2ImgPipeline,
        "tiny_sdxl_img2img_components",
        EulerAncestralDiscreteScheduler,
        dict(prompt=PROMPTS, image=IMAGE, strength=0.8, denoising_end=0.5, **NEGATIVE),
    ),
    "sd3": (StableDiffusion3Pipeline, "tiny_sd3_components", None, dict(prompt=PROMPTS, **NEGATIVE)),
    "flux": (  # true CFG: the parent's callback gets the prompt's embeddings alone
        FluxPipeline,
        "tiny_flux_components",
        None,
        dict(prompt=PROMPTS, height=16, width=16, max_sequence_length=8, true_cfg_scale=2.0, **NEGATIVE),
    ),
    "wan": (
        WanPipeline,
        "wan_components",
        FlowMatchEulerDiscreteScheduler,
        dict(prompt=PROMPTS, height=32, width=32, num_frames=9, max_sequence_length=16, **NEGATIVE),
    ),
}


def pipelines(request, name):
    """diffusers' pipeline on the shared tiny components, and our twin of it."""
    parent_class, fixture, scheduler, _ = TWINS[name]
    components = dict(request.getfixturevalue(fixture))
    if scheduler is not None:
        components["scheduler"] = scheduler.from_config(components["scheduler"].config)
    parent = parent_class(**components)
    twin = PCRAutoPipeline.from_pipe(parent)
    for pipe in (parent, twin):
        pipe.set_progress_bar_config(disable=True)
    return parent, twin


def call(name, **kwargs):
    """The case's arguments, 10 steps, latents out, fresh generators (one per image)."""
    return seeded({**TWINS[name][3], "num_inference_steps": STEPS, "output_type": "latent", "generators": 2, **kwargs})


def latents_of(output) -> torch.Tensor:
    return output.images if hasattr(output, "images") else output.frames


class Recorder:
    """A `callback_on_step_end` that only reads: records `(i, t, callback_kwargs)` (copies) and returns the kwargs."""

    def __init__(self):
        self.steps = []

    def __call__(self, pipe, i, t, callback_kwargs):
        self.steps.append((i, t.clone(), {name: _copy(value) for name, value in callback_kwargs.items()}))
        return callback_kwargs


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def assert_same_steps(ours: Recorder, theirs: Recorder, num_steps: int, relative: float) -> None:
    """The same steps, timesteps and tensors; the latents within `relative` of the parent's size, step by step."""
    assert [i for i, _, _ in ours.steps] == [i for i, _, _ in theirs.steps] == list(range(num_steps))
    for (i, t, got), (_, expected_t, expected) in zip(ours.steps, theirs.steps, strict=True):
        assert t.dtype == expected_t.dtype and torch.equal(t, expected_t), i
        assert got.keys() == expected.keys(), i
        latents, expected_latents = got["latents"].double(), expected["latents"].double()
        error = (latents - expected_latents).abs().max() / expected_latents.abs().max()
        assert error <= relative, f"step {i}: latents differ by {error:.1e} of their size"
        for key in got.keys() - {"latents"}:
            assert (got[key] is None and expected[key] is None) or torch.equal(got[key], expected[key]), (i, key)


@pytest.mark.parametrize("name", TWINS)
def test_callbacks_see_the_parent_steps(request, name):
    parent, twin = pipelines(request, name)
    tensor_inputs = list(parent._callback_tensor_inputs)
    theirs = Recorder()
    parent(**call(name), callback_on_step_end=theirs, callback_on_step_end_tensor_inputs=tensor_inputs)
    num_steps = parent.num_timesteps
    assert 0 < num_steps <= STEPS

    ours = Recorder()
    out = twin(
        **call(name),
        callback_on_step_end=ours,
        callback_on_step_end_tensor_inputs=tensor_inputs,
        tolerance=TOLERANCE,
        parallel=4,
    )
    assert out.stats.converged and out.stats.window == min(4, num_steps)
    assert_same_steps(ours, theirs, num_steps, 1e-6)
    assert torch.equal(ours.steps[-1][2]["latents"], latents_of(out))  # the last step's latents are the result

    # A window of one step is the parent's loop: bit for bit, but where the parent calls its transformer twice per
    # step (Wan's guidance, Flux's true CFG) and we once on both prompts' rows: float64 rounding
    ours = Recorder()
    twin(**call(name), callback_on_step_end=ours, callback_on_step_end_tensor_inputs=tensor_inputs, parallel=1)
    assert_same_steps(ours, theirs, num_steps, 1e-13 if name in ("wan", "flux") else 0.0)


def test_callbacks_see_the_newton_rounds_accepted_states(request):
    """At a looser tolerance each round accepts several steps; the callbacks get those accepted states, and after
    `max_rounds` the ones finished one at a time."""
    parent, twin = pipelines(request, "sd-img2img")
    theirs = Recorder()
    parent(**call("sd-img2img", num_inference_steps=20), callback_on_step_end=theirs)
    ours = Recorder()
    out = twin(**call("sd-img2img", num_inference_steps=20), callback_on_step_end=ours, parallel=8, tolerance=1e-4)
    assert out.stats.converged and out.stats.rounds < parent.num_timesteps == 16
    assert_same_steps(ours, theirs, 16, 1e-4)

    ours = Recorder()
    out = twin(**call("sd-img2img"), callback_on_step_end=ours, tolerance=TOLERANCE, max_rounds=2)
    assert out.stats.sequential_steps > 0
    theirs = Recorder()
    parent(**call("sd-img2img"), callback_on_step_end=theirs)
    assert_same_steps(ours, theirs, parent.num_timesteps, 1e-6)


class RecordingCallback(PipelineCallback):
    """A diffusers `PipelineCallback` that only reads: its `tensor_inputs` choose what it gets."""

    tensor_inputs = ["latents", "prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps.append((step_index, timestep.clone(), {name: _copy(v) for name, v in callback_kwargs.items()}))
        return callback_kwargs


class NegativeEmbeddingsCallback(RecordingCallback):
    tensor_inputs = ["negative_prompt_embeds"]


def recording_callbacks(*classes):
    callbacks = [cls(cutoff_step_ratio=1.0) for cls in classes]
    for callback in callbacks:
        callback.steps = []
    return callbacks


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_pipeline_callbacks_choose_their_tensors_as_in_the_parent(request, name):
    """SD's parent gives a `PipelineCallback` its own `tensor_inputs` (over `callback_on_step_end_tensor_inputs`),
    and so do we; Flux's parent does not, and neither do we."""
    parent, twin = pipelines(request, name)
    theirs, ours = recording_callbacks(RecordingCallback, RecordingCallback)
    parent(**call(name), callback_on_step_end=theirs)
    twin(**call(name), callback_on_step_end=ours, tolerance=TOLERANCE)
    keys = {"latents", "prompt_embeds"} if name == "sd" else {"latents"}
    assert {frozenset(kwargs) for _, _, kwargs in ours.steps} == {frozenset(keys)}
    assert_same_steps(ours, theirs, STEPS, 1e-6)


def test_multi_pipeline_callbacks_call_each_with_all_their_tensors(request):
    parent, twin = pipelines(request, "sd")
    theirs = recording_callbacks(RecordingCallback, NegativeEmbeddingsCallback)
    ours = recording_callbacks(RecordingCallback, NegativeEmbeddingsCallback)
    parent(**call("sd"), callback_on_step_end=MultiPipelineCallbacks(theirs))
    twin(**call("sd"), callback_on_step_end=MultiPipelineCallbacks(ours), tolerance=TOLERANCE)
    for mine, parents in zip(ours, theirs, strict=True):
        assert {frozenset(kwargs) for _, _, kwargs in mine.steps} == {
            frozenset({"latents", "prompt_embeds", "negative_prompt_embeds"})
        }
        assert_same_steps(mine, parents, STEPS, 1e-6)


def test_a_pipeline_callback_with_unknown_tensors_fails_before_any_model_call(request, monkeypatch):
    _, twin = pipelines(request, "sd")
    forbid_model_calls(twin, monkeypatch)
    (callback,) = recording_callbacks(RecordingCallback)
    callback.tensor_inputs = ["noise_pred"]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):  # the parent's check
        twin(**call("sd"), callback_on_step_end=callback)


def reads_and_adds(pipe, i, t, callback_kwargs):
    """Reads, keeps notes on the pipeline, returns an equal copy of the latents and a key the parent ignores."""
    pipe.notes = [*getattr(pipe, "notes", []), float(callback_kwargs["latents"].abs().max())]
    return {**callback_kwargs, "latents": callback_kwargs["latents"].clone(), "note": i}


def test_a_callback_that_only_reads_leaves_the_result_alone(request):
    _, twin = pipelines(request, "sd")
    plain = twin(**call("sd"), tolerance=TOLERANCE).images
    out = twin(**call("sd"), tolerance=TOLERANCE, callback_on_step_end=reads_and_adds)
    torch.testing.assert_close(out.images, plain, rtol=0, atol=0)


def halve_latents(pipe, i, t, callback_kwargs):
    return {**callback_kwargs, "latents": callback_kwargs["latents"] / 2}


def halve_latents_in_place(pipe, i, t, callback_kwargs):
    callback_kwargs["latents"].mul_(0.5)
    return callback_kwargs


def return_other_embeddings(pipe, i, t, callback_kwargs):  # not offered, but the parent pops it back
    return {**callback_kwargs, "prompt_embeds": torch.zeros(4, 16, 32, dtype=torch.float64)}


def guide_less_at_step_2(pipe, i, t, callback_kwargs):
    if i == 2:
        pipe._guidance_scale = 5.0
    return callback_kwargs


def interrupt(pipe, i, t, callback_kwargs):
    pipe._interrupt = True
    return callback_kwargs


STEERING = {  # found where the parent's loop passes the change on: the next step's latents, model call or scale
    "changed-latents": (halve_latents, "At step 1, .* passes other latents"),
    "latents-changed-in-place": (halve_latents_in_place, "At step 1, .* passes other latents"),
    "other-embeddings": (return_other_embeddings, "At step 1, .* calls `unet` with other conditioning"),
    "guidance-scale": (guide_less_at_step_2, "At step 3, .* has another `_guidance_scale`"),
    "cfg-cutoff": (SDCFGCutoffCallback(cutoff_step_ratio=0.4), "At step 5, .* calls `unet` with other conditioning"),
}


@pytest.mark.parametrize("callback, match", STEERING.values(), ids=STEERING)
@pytest.mark.parametrize("parallel", [4, 1])
def test_a_callback_that_steers_is_an_error(request, callback, match, parallel):
    _, twin = pipelines(request, "sd")
    with pytest.raises(ValueError, match=match) as error:
        twin(**call("sd"), callback_on_step_end=callback, parallel=parallel)
    message = str(error.value)
    assert "can only observe" in message and "StableDiffusionPipeline" in message


def interrupt_after(step):
    def interrupt(pipe, i, t, callback_kwargs):
        pipe._interrupt = pipe._interrupt or i == step
        return callback_kwargs

    return interrupt


def test_an_interrupt_stops_where_the_parent_stops(request):
    """`pipe._interrupt` set by a callback: the parent's loop skips the later steps, and returns the latents of the
    step where it stopped, here the accepted state of that step."""
    parent, twin = pipelines(request, "sd")
    expected = parent(**call("sd"), callback_on_step_end=interrupt_after(3)).images
    out = twin(**call("sd"), tolerance=TOLERANCE, callback_on_step_end=interrupt_after(3))
    assert (out.images - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (out.images - twin(**call("sd"), tolerance=TOLERANCE).images).abs().max() > 1e-2  # it did stop early


def test_a_callback_that_returns_nothing_fails_as_in_the_parent(request):
    parent, twin = pipelines(request, "sd")
    for pipe in (parent, twin):
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'pop'"):
            pipe(**call("sd"), callback_on_step_end=lambda pipe, i, t, callback_kwargs: None)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_the_current_timestep_is_the_parents_during_callbacks(request, name):
    """Flux's and Wan's parents show the step's timestep as `pipe.current_timestep`, and None after the loop."""
    parent, twin = pipelines(request, name)
    seen = {parent: [], twin: []}
    for pipe in (parent, twin):

        def note_timestep(pipe_of_call, i, t, callback_kwargs, notes=seen[pipe]):
            notes.append(pipe_of_call.current_timestep)
            return callback_kwargs

        pipe(**call(name, num_inference_steps=3), callback_on_step_end=note_timestep)
        assert pipe.current_timestep is None
    assert len(seen[twin]) == len(seen[parent]) == 3
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(seen[twin], seen[parent], strict=True))
