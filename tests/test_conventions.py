"""Our classes follow their parents' call conventions: signatures (as `inspect` and diffusers' `retrieve_timesteps`
see them), return tuples, accepted argument types; concurrent calls; save and reload; learned variances."""

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import tiny_unet2d
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from pcr_diffusers.parent_loop import PCRParentLoopMixin
from pcr_diffusers.pipeline_utils import parent_pipeline_class
from pcr_diffusers.pipelines import (
    PCRDDIMPipeline,
    PCRDDPMPipeline,
    PCRStableDiffusion3Pipeline,
    PCRStableDiffusionPipeline,
    PCRStableDiffusionXLPipeline,
    auto_pipeline,
)
from pcr_diffusers.schedulers import PCR_SCHEDULERS

PIPELINES = [
    (parent_pipeline_class(auto_pipeline.twin_class(name)), auto_pipeline.twin_class(name))
    for name in auto_pipeline.TWINS
]  # DDPM, DDIM first
assert PIPELINES[:2] == [(DDPMPipeline, PCRDDPMPipeline), (DDIMPipeline, PCRDDIMPipeline)]
OUR_OPTIONS = ["parallel", "tolerance", "jacobian", "max_rounds", "max_memory"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("parent, twin", PCR_SCHEDULERS.items(), ids=lambda c: c.__name__)
def test_twin_schedulers_keep_every_public_signature_of_their_parent(parent, twin):
    for name, member in inspect.getmembers(parent, callable):
        if name.startswith("_") and name != "__init__":
            continue
        assert inspect.signature(getattr(twin, name)) == inspect.signature(member), name


@pytest.mark.parametrize("parent, twin", PCR_SCHEDULERS.items(), ids=lambda c: c.__name__)
def test_retrieve_timesteps_passes_custom_schedules_to_the_twins(parent, twin):
    """FluxPipeline always passes `sigmas`, SD pipelines pass `timesteps`: our twins take what their parents take."""
    accepts = inspect.signature(parent.set_timesteps).parameters
    for name, values in (("timesteps", [999, 700, 400, 100]), ("sigmas", [1.0, 0.7, 0.4, 0.1])):
        if name not in accepts:
            continue
        theirs, ours = parent(), twin()
        try:
            expected = retrieve_timesteps(theirs, None, None, **{name: values})
        except ValueError:  # a parent that declares the argument but refuses it: so must the twin
            with pytest.raises(ValueError):
                retrieve_timesteps(ours, None, None, **{name: values})
            continue
        got = retrieve_timesteps(ours, None, None, **{name: values})
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        assert got[1] == expected[1]


@pytest.mark.parametrize("parent, twin", PIPELINES, ids=lambda c: c.__name__)
def test_pipelines_keep_the_parent_call_arguments_then_add_ours(parent, twin):
    theirs = inspect.signature(parent.__call__).parameters
    ours = inspect.signature(twin.__call__).parameters
    named = [name for name, p in theirs.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert [name for name in ours if name in named] == named  # the parent's arguments, in its order
    for name in named:
        assert ours[name].default == theirs[name].default, name
        assert ours[name].kind == theirs[name].kind, name
    for name in OUR_OPTIONS:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert set(ours) == set(theirs) | set(OUR_OPTIONS)  # `**kwargs` only where the parent has it


def test_unconditional_pipelines_take_the_parent_argument_types(tiny_unet):
    """`np.int64` step counts and batch sizes; any `output_type` but "pil" gives numpy, as in DDPMPipeline; the
    parent's tuple and output class."""
    for parent_class, twin_class, scheduler in [
        (DDPMPipeline, PCRDDPMPipeline, DDPMScheduler()),
        (DDIMPipeline, PCRDDIMPipeline, DDIMScheduler()),
    ]:
        parent = parent_class(tiny_unet, scheduler)
        parent.set_progress_bar_config(disable=True)
        twin = twin_class.from_pipe(parent)
        for output_type in ("pil", "np", "numpy", "pt", "latent"):
            kwargs = dict(batch_size=np.int64(2), num_inference_steps=np.int64(3), output_type=output_type)
            theirs = parent(generator=torch.Generator().manual_seed(0), **kwargs)
            ours = twin(generator=torch.Generator().manual_seed(0), tolerance=1e-9, **kwargs)
            assert type(ours) is type(theirs) and ours.keys() == theirs.keys()
            assert type(ours.images) is type(theirs.images)
            assert ours.stats.converged and ours.stats is twin.stats
        tuple_theirs = parent(generator=torch.Generator().manual_seed(0), num_inference_steps=3, return_dict=False)
        tuple_ours = twin(generator=torch.Generator().manual_seed(0), num_inference_steps=3, return_dict=False)
        assert len(tuple_ours) == len(tuple_theirs) == 1


def sd_pipelines(request, name, scheduler=None):
    fixture, parent_class, twin_class = {
        "sd": ("tiny_sd_components", StableDiffusionPipeline, PCRStableDiffusionPipeline),
        "sdxl": ("tiny_sdxl_components", StableDiffusionXLPipeline, PCRStableDiffusionXLPipeline),
        "sd3": ("tiny_sd3_components", StableDiffusion3Pipeline, PCRStableDiffusion3Pipeline),
    }[name]
    components = dict(request.getfixturevalue(fixture))
    if scheduler is not None:
        components["scheduler"] = scheduler.from_config(components["scheduler"].config)
    parent = parent_class(**components)
    parent.set_progress_bar_config(disable=True)
    twin = twin_class.from_pipe(parent)
    return parent, twin


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sd", dict(num_inference_steps=None, timesteps=[999, 600, 300, 50])),
        ("sdxl", dict(num_inference_steps=None, timesteps=[999, 600, 300, 50])),
        ("sd3", dict(num_inference_steps=None, sigmas=[1.0, 0.6, 0.3])),
        ("sd", dict(num_inference_steps=np.int64(3))),
        ("sd3", dict(num_inference_steps=np.int32(3))),
    ],
    ids=["sd-timesteps", "sdxl-timesteps", "sd3-sigmas", "sd-np-int64", "sd3-np-int32"],
)
def test_text_to_image_takes_the_parent_argument_types_and_returns_its_tuple(request, name, kwargs):
    custom = "timesteps" in kwargs and name == "sd"  # SD's default DDIM refuses custom timesteps, as in diffusers
    parent, twin = sd_pipelines(request, name, DDPMScheduler if custom else None)
    kwargs = dict(prompt="a cat", output_type="latent", **kwargs)
    theirs = parent(generator=torch.Generator().manual_seed(0), return_dict=False, **kwargs)
    ours = twin(generator=torch.Generator().manual_seed(0), return_dict=False, tolerance=1e-9, **kwargs)
    assert len(ours) == len(theirs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6 * theirs[0].abs().max().item())
    assert twin.stats.converged and twin.num_timesteps == parent.num_timesteps
    out = twin(generator=torch.Generator().manual_seed(0), **kwargs)
    assert type(out) is type(parent(generator=torch.Generator().manual_seed(0), **kwargs))


def test_concurrent_calls_return_what_single_calls_return(request):
    """One pipeline, two threads at once, different step counts and guidance scales: each call its own state."""
    _, twin = sd_pipelines(request, "sd", EulerDiscreteScheduler)
    cases = [dict(num_inference_steps=3, guidance_scale=1.0), dict(num_inference_steps=25, guidance_scale=9.0)]

    def run(case):
        return twin("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **case).images

    alone = [run(case) for case in cases]
    for _ in range(5):  # without the prompt-encoding lock, about one run in five failed here
        barrier = threading.Barrier(len(cases))  # both calls start together

        def together(case, barrier=barrier):
            barrier.wait()
            return run(case)

        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(together, cases))  # a thread's exception is raised here
        for result, expected in zip(results, alone, strict=True):
            assert torch.equal(result, expected)


@pytest.mark.parametrize("parent, twin", PIPELINES[2:], ids=lambda c: c.__name__)
def test_text_to_image_twins_run_their_parents_call(parent, twin):
    """The extension point: a twin states what differs and runs the parent's own `__call__` (no copy of it)."""
    assert issubclass(twin, PCRParentLoopMixin)
    assert twin.__call__.__code__ is PCRStableDiffusionPipeline.__call__.__code__  # the mixin's, made per class
    assert twin.__call__.__doc__.startswith(f"`{parent.__name__}.__call__`")


def test_a_call_leaves_the_pipeline_as_it_was(request):
    """The stand-ins (denoisers, scheduler step, prompt encoding) belong to the call's copy, never to the pipeline."""
    _, twin = sd_pipelines(request, "sd", EulerDiscreteScheduler)
    before = dict(vars(twin))
    twin("a cat", num_inference_steps=3, output_type="latent")
    assert type(twin.unet).__name__ == "UNet2DConditionModel" and twin.unet is before["unet"]
    assert twin.scheduler is before["scheduler"] and "step" not in vars(twin.scheduler)
    assert "encode_prompt" not in vars(twin) and not any(name.startswith("_pcr") for name in vars(twin))
    assert twin.num_timesteps == 3  # what the parent leaves readable after a call is copied back


@pytest.mark.parametrize("parent_class, twin_class", PIPELINES[:2], ids=["ddpm", "ddim"])
def test_a_saved_pcr_pipeline_is_a_parent_folder_that_reloads_as_itself(tiny_unet, tmp_path, parent_class, twin_class):
    scheduler = DDPMScheduler() if parent_class is DDPMPipeline else DDIMScheduler()
    twin = twin_class(tiny_unet, scheduler)
    twin.set_progress_bar_config(disable=True)
    twin.save_pretrained(tmp_path)
    kwargs = dict(num_inference_steps=5, output_type="np")
    expected = twin(generator=torch.Generator().manual_seed(0), **kwargs).images
    for loader, loaded_class in [
        (twin_class, twin_class),  # ours
        (parent_class, parent_class),  # the folder is the parent's, as diffusers' own tests reload it
        (DiffusionPipeline, parent_class),
    ]:
        loaded = loader.from_pretrained(tmp_path, torch_dtype=torch.float64)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is loaded_class and type(loaded.scheduler) is type(scheduler)
    images = twin_class.from_pretrained(tmp_path, torch_dtype=torch.float64)(
        generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    np.testing.assert_array_equal(images, expected)


def test_a_saved_text_to_image_pipeline_reloads_as_itself(request, tmp_path):
    _, twin = sd_pipelines(request, "sd")
    twin.save_pretrained(tmp_path)
    for loader in (PCRStableDiffusionPipeline, StableDiffusionPipeline):
        loaded = loader.from_pretrained(
            tmp_path, torch_dtype=torch.float64, safety_checker=None, feature_extractor=None
        )
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is loader
    kwargs = dict(prompt="a cat", num_inference_steps=4, output_type="latent")
    a = twin(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images  # the parent: within the tolerance
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("parent, twin", PCR_SCHEDULERS.items(), ids=lambda c: c.__name__)
def test_twin_schedulers_list_themselves_and_their_parent_as_compatible(parent, twin):
    assert {parent, twin} <= set(twin().compatibles)
    assert set(parent().compatibles) <= set(twin().compatibles)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_models_match_the_parent(variance_type):
    """A UNet that outputs twice the channels (noise and variance), as `DDPMScheduler.step` splits them."""
    unet = tiny_unet2d(out_channels=2).double()
    if variance_type == "learned":  # the raw output is the variance: keep it positive, as a trained model's is
        unet.conv_out.bias.data[1] = 3.0
    parent = DDPMPipeline(unet, DDPMScheduler(variance_type=variance_type))
    parent.set_progress_bar_config(disable=True)
    ref = parent(generator=torch.Generator().manual_seed(0), num_inference_steps=12, output_type="np").images
    out = PCRDDPMPipeline.from_pipe(parent)(
        generator=torch.Generator().manual_seed(0), num_inference_steps=12, output_type="np", tolerance=1e-7
    )
    assert out.stats.converged
    np.testing.assert_allclose(out.images, ref, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler],
    ids=lambda c: c.__name__,
)
def test_twin_schedulers_work_as_plain_schedulers(scheduler):
    """Wherever the parallel path is not used, the twin is its parent: the same `step` results."""
    twin = PCR_SCHEDULERS[scheduler]()
    parent = scheduler()
    for s in (parent, twin):
        s.set_timesteps(5)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in parent.timesteps:
        a = parent.step(x, t, parent.scale_model_input(x, t), generator=torch.Generator().manual_seed(1))
        b = twin.step(x, t, twin.scale_model_input(x, t), generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.prev_sample, b.prev_sample)


def test_flow_matching_twin_is_a_plain_scheduler_too():
    twin, parent = PCR_SCHEDULERS[FlowMatchEulerDiscreteScheduler](), FlowMatchEulerDiscreteScheduler()
    for s in (parent, twin):
        s.set_timesteps(sigmas=[1.0, 0.5, 0.2])
    torch.testing.assert_close(twin.timesteps, parent.timesteps, rtol=0, atol=0)
