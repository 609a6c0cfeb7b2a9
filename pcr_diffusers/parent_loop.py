"""The extension point of our pipelines: the parent pipeline's own `__call__`, with its denoising loop answered by the
parallel solve.

A pcr-diffusers pipeline is `PCRParentLoopMixin` + the diffusers pipeline it stands in for. Its `__call__` runs the
parent's `__call__` as written (checks, prompt encoding, latents, the loop with its callbacks and progress bar,
decoding, output) on a per-call copy of the pipeline, in which the denoiser components (`denoisers`: "unet",
"transformer", "controlnet") and the scheduler's `step` are stood in for:

    loop step 0:     denoiser calls                          -> recorded (`ModelCall`), answered with zeros
                     scheduler.step(_, t_0, x_0, **kwargs)   -> solves every step from x_0 at once with the batched
                                                                model `chain_model(calls, ...)`; answers x_1
    loop step i > 0: denoiser calls                          -> checked against step 0's, answered with zeros
                     scheduler.step(_, t_i, x_i)             -> checks x_i is the answer to step i - 1; answers x_{i+1}

so a twin states only what differs from its parent, in a few dozen lines: how the model calls of one step become
one batched call of many steps (`chain_model`, usually `GuidedModel` over the recorded conditioning), and, where
there is any, what a step does besides `scheduler.step` (`chain_after_step`: inpainting's blend).

What cannot run in parallel is what would steer the steps after the solve: a callback that changes the latents,
the conditioning or the guidance. Each is found where the loop passes it on (the next step's latents, model call or
pipeline attributes) and raises a `ValueError` that names it. Whatever only observes the steps -- callbacks that
read, `interrupt`, the legacy `callback` -- is the parent's own code and sees the accepted state of every step.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import BaseOutput

from .pipeline_utils import PCRPipelineMixin, parent_pipeline_class
from .sampling import ParallelOptions, SamplingStats
from .schedulers import PCRScheduler
from .text_to_image import TEXT_ENCODING_LOCK, UNSUPPORTED, GuidedModel

OPTIONS = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields(ParallelOptions)
]
# The parents' `**kwargs` carry only the legacy callback, which our loop supports as the parent does.
LEGACY_KWARGS = ("callback", "callback_steps")
# A denoiser call's arguments that are the step's own: its latents and timestep.
STEP_INPUTS = ("sample", "hidden_states", "timestep")
# Pipeline attributes the parent loop itself changes per step, or a callback may change without steering.
UNWATCHED = ("_current_timestep", "_progress_bar_config", "_interrupt")


@dataclass
class ModelCall:
    """One call of a denoiser component by the parent's loop."""

    name: str
    args: tuple
    kwargs: dict

    def conditioning(self, varying=STEP_INPUTS) -> dict:
        """The keyword arguments but those `varying` from step to step and `return_dict`: what every step passes
        alike."""
        return {key: value for key, value in self.kwargs.items() if key not in (*varying, "return_dict")}


@dataclass
class DenoiserOutput(BaseOutput):
    """The stand-in's answer when the parent asks for a dict (`.sample`, or `[0]` as a tuple)."""

    sample: torch.Tensor


def same_value(a, b) -> bool:
    """Whether a conditioning value passed at a later step is the one step 0 passed: the same tensor (or equal), and
    the same for the items of dicts, lists and tuples, else `==`."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and (a.device.type == "meta" or bool(torch.equal(a, b)))  # meta tensors have no values to compare
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def fingerprint(value):
    """What tells whether a pipeline attribute changed: a number's, string's or None's value, a dict's entries, else
    the object itself (by identity)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value), value
    if isinstance(value, dict):
        return tuple((key, fingerprint(item)) for key, item in value.items())
    return id(value)


class StandIn:
    """A denoiser component of the pipeline during one call: calls go to `loop.model_call`; everything else (its
    config, dtype, device, submodules, hooks, and `isinstance` checks) is the component's."""

    def __init__(self, module, name: str, loop: "ParentLoop"):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_loop", loop)

    @property
    def __class__(self):
        return type(self._module)

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        return self._loop.model_call(self._name, self._module, args, kwargs)


class ParentLoop:
    """One call's stand-in for the parent loop's model calls and scheduler steps; see the module docstring.

    Args:
        pipe: the call's copy of the pipeline, whose scheduler is our twin.
        options: the solver's options.
        arguments: the call's arguments by name, defaults included.
    """

    def __init__(self, pipe, options: ParallelOptions, arguments: dict):
        self.pipe = pipe
        self.options = options
        self.arguments = arguments
        self.modules = {name: getattr(pipe, name) for name in pipe.denoisers if getattr(pipe, name, None) is not None}
        self.calls: list[ModelCall] = []  # step 0's denoiser calls
        self.step_calls = 0  # denoiser calls of the loop's current step
        self.solving = False
        self.states = None  # (N, B, ...): the accepted state after each step of the chain
        self.steps = None  # the chain's positions in the schedule
        self.recorded = {}  # the last results of `get_timesteps` and the pipeline's `recorded_methods`, by name
        self.answered = 0  # the loop's steps answered so far
        self.watched = None  # the pipeline's attributes after step 0, by name
        self.stats = None
        self.step_signature = inspect.signature(type(pipe.scheduler).step)  # to read the loop's step arguments

    def stand_in(self) -> None:
        """Puts the stand-ins on the call's pipeline: the denoisers, the scheduler's `step`, the timesteps on the
        host (the twin's tables move to the latents' device once), prompt encoding under `TEXT_ENCODING_LOCK`, and
        `get_timesteps`, whose kept steps say where an image-to-image chain starts."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        for name, module in self.modules.items():
            object.__setattr__(pipe, name, StandIn(module, name, self))
        # what is the call's own, not copied back to the caller
        pipe._pcr_per_call = {*self.modules, "encode_prompt", "get_timesteps", *pipe.recorded_methods}

        @functools.wraps(scheduler.step)
        def step(*args, **kwargs):
            return self.scheduler_step(*args, **kwargs)

        scheduler.step = step
        set_timesteps = scheduler.set_timesteps

        @functools.wraps(set_timesteps)
        def on_host(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = None
            elif len(args) > 1:
                args = (args[0], None, *args[2:])
            return set_timesteps(*args, **kwargs)

        scheduler.set_timesteps = on_host
        if hasattr(pipe, "encode_prompt"):
            encode_prompt = pipe.encode_prompt

            @functools.wraps(encode_prompt)
            def locked(*args, **kwargs):
                with TEXT_ENCODING_LOCK:
                    return encode_prompt(*args, **kwargs)

            object.__setattr__(pipe, "encode_prompt", locked)
        for name in ("get_timesteps", *pipe.recorded_methods):
            if hasattr(pipe, name):
                object.__setattr__(pipe, name, self.recording(name, getattr(pipe, name)))

    def recording(self, name: str, method: Callable) -> Callable:
        """`method`, keeping its last result in `self.recorded[name]`."""

        @functools.wraps(method)
        def recorded(*args, **kwargs):
            self.recorded[name] = method(*args, **kwargs)
            return self.recorded[name]

        return recorded

    def model_call(self, name: str, module, args: tuple, kwargs: dict):
        if self.solving:
            return module(*args, **kwargs)
        call = ModelCall(name, args, kwargs)
        if self.states is None:
            self.calls.append(call)
        elif self.step_calls >= len(self.calls) or not self.same_call(self.calls[self.step_calls], call):
            self.refuse(f"calls `{name}` with other conditioning than at step 0 (prompt embeddings, guidance rows)")
        self.step_calls += 1
        return self.pipe.dummy_output(call, self.modules[name])

    def same_call(self, first: ModelCall, call: ModelCall) -> bool:
        varying = self.pipe.varying_inputs
        if call.name != first.name or call.kwargs.keys() != first.kwargs.keys() or len(call.args) != len(first.args):
            return False
        shapes = [a.shape for a in call.args if isinstance(a, torch.Tensor)]
        if shapes != [a.shape for a in first.args if isinstance(a, torch.Tensor)]:  # the rows: guidance on or off
            return False
        return all(same_value(first.kwargs[key], value) for key, value in call.kwargs.items() if key not in varying)

    def scheduler_step(self, model_output, timestep, sample, *args, **kwargs):
        bound = self.step_signature.bind(self.pipe.scheduler, model_output, timestep, sample, *args, **kwargs)
        return_dict = bound.arguments.get("return_dict", True)
        if self.states is None:
            step_kwargs = {
                key: value
                for key, value in bound.arguments.items()
                if key not in ("self", "model_output", "timestep", "sample", "return_dict")
            }
            self.solve(timestep, sample, step_kwargs)
        else:
            self.check_step(timestep, sample)
        self.step_calls = 0
        # the loop's own copy, which a callback may edit, in the dtype of the schedulers' arithmetic on its inputs
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        answer = self.pipe.loop_sample(self.states[self.answered], self.arguments).to(dtype, copy=True)
        if hasattr(self.pipe.scheduler, "_step_index"):  # as the scheduler's own step leaves it, for `add_noise`
            self.pipe.scheduler._step_index = self.steps[self.answered] + 1
        self.answered += 1
        return SchedulerOutput(prev_sample=answer) if return_dict else (answer,)

    def solve(self, timestep, sample: torch.Tensor, step_kwargs: dict) -> None:
        """The parallel solve of the chain from the loop's first latents `sample` `(B, ...)`, with the scheduler
        step's keyword arguments of the loop (`eta`, `generator`, ...)."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        num_timesteps = len(scheduler.timesteps)
        # an image-to-image parent runs the schedule's last steps that its `get_timesteps` keeps
        start = num_timesteps - len(self.recorded["get_timesteps"][0]) if "get_timesteps" in self.recorded else 0
        stop = pipe.chain_stop(self.arguments, start)
        if not 0 <= start < stop <= num_timesteps or float(timestep) != float(scheduler.timesteps[start]):
            raise ValueError(
                f"{type(pipe).__name__}: the loop's first step has timestep {float(timestep):g}, but the chain "
                f"expected position {start} of the scheduler's {num_timesteps} timesteps; the parent's loop is not "
                f"one this pipeline can follow."
            )
        self.steps = range(start, stop)
        generator = step_kwargs.pop("generator", None)
        noise = scheduler.draw_noise(
            sample.shape, generator, sample.device, sample.dtype, steps=self.steps, **step_kwargs
        )
        sample = pipe.chain_sample(sample, self.arguments)
        if noise is not None:
            noise = noise[:, : len(sample)]  # (N, B, ...): the draws of the chain's rows, the loop's first
        sample = sample.to(pipe.chain_dtype(sample))
        self.solving = True
        try:
            model = pipe.chain_model(self.calls, sample, self.arguments)
            after_step = pipe.chain_after_step(self.steps, noise, sample, self.recorded)
            self.states, self.stats = pipe.pcr_denoise(
                model,
                scheduler,
                sample,
                noise,
                self.options,
                step_kwargs=step_kwargs,
                steps=self.steps,
                after_step=after_step,
                keep_states=True,
            )
        finally:
            self.solving = False
        self.watched = {name: fingerprint(value) for name, value in vars(pipe).items() if name not in UNWATCHED}

    def check_step(self, timestep, sample: torch.Tensor) -> None:
        """At the loop's step i > 0: it is one of the chain's, its latents are the answer to step i - 1 (which the
        parent may have blended again, to the same values), its model calls and the pipeline are as at step 0."""
        if self.answered >= len(self.steps):
            self.refuse(f"runs more steps than the {len(self.steps)} solved")
        position = self.steps[self.answered]
        if float(timestep) != float(self.pipe.scheduler.timesteps[position]):
            self.refuse(f"runs timestep {float(timestep):g} where the schedule has another")
        expected = self.pipe.loop_sample(self.states[self.answered - 1], self.arguments).to(sample.dtype)
        if not same_value(sample, expected):  # edited in place too
            self.refuse("passes other latents than the accepted state of the step before (a callback changed them)")
        if self.step_calls != len(self.calls):
            self.refuse(f"makes {self.step_calls} denoiser calls where step 0 made {len(self.calls)}")
        for name, before in self.watched.items():  # those a callback adds are its own
            if name not in vars(self.pipe) or fingerprint(vars(self.pipe)[name]) != before:
                self.refuse(f"has another `{name}` than the solve had (a callback changed or deleted it)")

    def refuse(self, what: str) -> None:
        ours = type(self.pipe).__name__
        parent = parent_pipeline_class(type(self.pipe)).__name__
        raise ValueError(
            f"At step {self.answered}, the loop of {parent} {what}. {ours} solved every step together before the "
            f"loop's second step, so nothing may steer the later steps: a `callback_on_step_end` can only observe "
            f"(return `callback_kwargs` unchanged and leave the pipeline's attributes as they are). Use {parent} "
            f"for a callback that steers (e.g. `SDCFGCutoffCallback`)."
        )


def _parent_loop_call(parent) -> Callable:
    """`__call__` for a twin of `parent`: the parent's signature and our keyword-only options (see `OPTIONS`)."""
    signature = inspect.signature(parent.__call__)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    full = signature.replace(parameters=named + OPTIONS + rest)

    def __call__(self, *args, **kwargs):
        arguments = full.bind(self, *args, **kwargs)  # a TypeError for what the parent does not take, as its own
        arguments.apply_defaults()
        arguments = dict(arguments.arguments)
        options = ParallelOptions(**{p.name: arguments.pop(p.name) for p in OPTIONS})
        for p in rest:
            arguments.update(arguments.pop(p.name))
        for p in OPTIONS:
            kwargs.pop(p.name, None)
        return self.call_parent_loop(parent, args, kwargs, arguments, options)

    __call__.__signature__ = full
    __call__.__doc__ = (
        f"`{parent.__name__}.__call__`, with the denoising loop solved in parallel over time.\n\n"
        "Takes the parent's arguments, and returns its output (or tuple), with the statistics as the output's "
        "`.stats` and `pipeline.stats`; plus `parallel`, `tolerance`, `jacobian`, `max_rounds`, `max_memory`: the "
        "window solver's options (`ParallelOptions`). `callback_on_step_end` is called as the parent calls it, "
        "with each step's accepted latents, and may only observe.\n"
    )
    return __call__


class PCRParentLoopMixin(PCRPipelineMixin):
    """A diffusers pipeline whose denoising loop is solved in parallel inside its own `__call__`; see the module
    docstring. A twin sets `denoisers` and implements `chain_model`; the rest has defaults.

    Attributes:
        denoisers: the names of the components the loop calls every step (the first one is the main denoiser).
        varying_inputs: the denoiser keyword arguments that may differ from step to step (besides the latents and
            timestep, e.g. ControlNet's per-step scale); all others must stay as at step 0.
        unsupported: the parent's arguments we refuse unless None, by name, with the reason.
        recorded_methods: the pipeline's methods whose results `chain_after_step` reads (`prepare_latents`, ...).
    """

    denoisers: tuple[str, ...] = ("unet",)
    varying_inputs: tuple[str, ...] = STEP_INPUTS
    unsupported: dict[str, str] = {}
    recorded_methods: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" not in vars(cls):
            cls.__call__ = _parent_loop_call(parent_pipeline_class(cls))

    def call_parent_loop(self, parent, args: tuple, kwargs: dict, arguments: dict, options: ParallelOptions):
        """Checks the call, then runs the parent's `__call__` on a copy of the pipeline with its loop stood in for.
        `args`, `kwargs`: the call's, without our options; `arguments`: every argument by name."""
        self.check_call(arguments)
        pipe = self.for_call(PCRScheduler.from_scheduler(self.scheduler))
        loop = ParentLoop(pipe, options, arguments)
        loop.stand_in()
        output = parent.__call__(pipe, *args, **kwargs)
        stats = loop.stats or SamplingStats(rounds=0, model_evaluations=0, converged=True)  # the loop ran no step
        pipe.record_call(stats)  # the parent has freed its hooks
        if not isinstance(output, tuple):  # the parent's own output, or its own tuple
            output.stats = stats  # an attribute, not a field: the output unpacks and indexes like the parent's
        return output

    def check_call(self, arguments: dict) -> None:
        """Our checks, before any model call: `num_inference_steps` (None allowed with custom `timesteps` or
        `sigmas`), the scheduler, the arguments we refuse, the `**kwargs` the parent would ignore, and the number
        of generators (which the parent checks only after encoding the prompt)."""
        if "num_inference_steps" in arguments:
            custom = arguments.get("timesteps") is not None or arguments.get("sigmas") is not None
            self.check_num_inference_steps(arguments["num_inference_steps"], custom)
        self.check_scheduler()
        parent = parent_pipeline_class(type(self)).__name__
        for name, why in {**UNSUPPORTED, **self.unsupported}.items():
            if name in LEGACY_KWARGS or arguments.get(name) is None:
                continue
            raise ValueError(
                f"{type(self).__name__} does not support `{name}`: {why}. Leave it unset, or use {parent}."
            )
        named = inspect.signature(type(self).__call__).parameters
        if unknown := [name for name in arguments if name not in named and name not in LEGACY_KWARGS]:
            raise ValueError(f"{parent} takes no argument {', '.join(f'`{n}`' for n in unknown)}.")
        if "generator" in arguments and "prompt" in arguments:
            self.check_generator(arguments["generator"], self.prompt_batch_size(arguments))
        for name in self.denoisers:
            if getattr(getattr(self, name, None), "is_cache_enabled", False):
                raise ValueError(
                    f"{type(self).__name__} does not support the {name}'s step cache: it reuses the previous step's "
                    f"activations, and parallel sampling evaluates the steps out of order. Call "
                    f"`pipe.{name}.disable_cache()`, or use {parent}."
                )
        strength = arguments.get("strength")
        if hasattr(self, "get_timesteps") and isinstance(strength, (int, float)) and 0 <= strength <= 1:
            self.check_kept_steps(arguments)

    def check_kept_steps(self, arguments: dict) -> None:
        """An image-to-image call keeps some step of the schedule (the parent's `get_timesteps` with `strength`, or
        SDXL's `denoising_start`, up to `chain_stop`): found on a copy of the scheduler, with no model call."""
        pipe = self.for_call(PCRScheduler.from_scheduler(self.scheduler))
        custom = {name: arguments.get(name) for name in ("timesteps", "sigmas")}
        retrieve_timesteps(pipe.scheduler, arguments["num_inference_steps"], None, **custom)
        num_timesteps = len(pipe.scheduler.timesteps)
        num_inference_steps = num_timesteps if any(v is not None for v in custom.values()) else None
        start = {"denoising_start": arguments["denoising_start"]} if "denoising_start" in arguments else {}
        if isinstance(start.get("denoising_start"), float) and not 0 < start["denoising_start"] < 1:
            start = {"denoising_start": None}  # a value the parent ignores
        kept, _ = pipe.get_timesteps(
            num_inference_steps or arguments["num_inference_steps"], arguments["strength"], None, **start
        )
        begin = num_timesteps - len(kept)
        if pipe.chain_stop(arguments, begin) <= begin:
            names = ("strength", "num_inference_steps", "denoising_start", "denoising_end")
            given = ", ".join(f"`{n}`={arguments[n]!r}" for n in names if arguments.get(n) is not None)
            raise ValueError(
                f"{given} leave no denoising step of the {num_timesteps} timesteps: the parent runs "
                f"`int(num_inference_steps * strength)` of them. Raise `strength` or `num_inference_steps`."
            )

    @staticmethod
    def prompt_batch_size(arguments: dict) -> int:
        """The loop's batch: prompts (or prompt embeddings) x images per prompt."""
        prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
        if isinstance(prompt, str) or (prompt is None and embeds is None):
            batch_size = 1
        else:
            batch_size = len(prompt) if prompt is not None else embeds.shape[0]
        per_prompt = arguments.get("num_images_per_prompt", arguments.get("num_videos_per_prompt"))
        return batch_size * (per_prompt or 1)

    def chain_model(self, calls: list[ModelCall], latents: torch.Tensor, arguments: dict) -> Callable:
        """The batched model of the chain, `model_fn(x, t)` for `DenoisingChain`, from step 0's denoiser `calls`,
        its latents `(B, ...)` and the call's `arguments`. Denoiser calls made here run the components."""
        raise NotImplementedError

    def chain_after_step(self, steps: range, noise, latents: torch.Tensor, recorded: dict) -> Callable | None:
        """What a step does besides `scheduler.step` (`DenoisingChain`'s `after_step`), or None; `noise`: the
        steps' draws, `recorded`: the results of `recorded_methods` by name."""
        return None

    def chain_sample(self, sample: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The chain's state from the latents the loop passes to `scheduler.step` (default: them): their first rows
        where the loop carries copies (DiT's guidance rows)."""
        return sample

    def loop_sample(self, state: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The latents the loop gets back for the chain's `state` (the inverse of `chain_sample`)."""
        return state

    def chain_dtype(self, latents: torch.Tensor) -> torch.dtype:
        """The dtype of the chain's states, given the loop's first latents (default: theirs)."""
        return latents.dtype

    def chain_stop(self, arguments: dict, start: int) -> int:
        """Where the loop stops in the schedule (default: its end)."""
        return len(self.scheduler.timesteps)

    def dummy_output(self, call: ModelCall, module):
        """What a stand-in answers a denoiser call with: zeros of the shape of the model's output, so that the
        parent's arithmetic on them runs (its result is not used), as the tuple or output the call asks for."""
        sample = call.args[0] if call.args else call.kwargs.get("sample", call.kwargs.get("hidden_states"))
        shape = list(sample.shape)
        channels = getattr(module.config, "out_channels", None)
        if channels and sample.ndim >= 4:
            shape[1] = channels
        output = sample.new_zeros(shape)
        return DenoiserOutput(sample=output) if call.kwargs.get("return_dict", True) else (output,)

    def guided_model(self, call: ModelCall, model: Callable, latents: torch.Tensor, **extra) -> GuidedModel:
        """`GuidedModel` over one recorded call (its conditioning, and `extra` per-row conditioning) with the
        guidance rows batched as the parents batch them (negative first), the scale as `self.guidance_scale` and
        `do_classifier_free_guidance` say."""
        guidance = self.guidance_scale if self.do_classifier_free_guidance else None
        rescale = getattr(self, "guidance_rescale", 0.0) if guidance is not None else 0.0
        conditioning = {**call.conditioning(self.varying_inputs), **extra}
        return GuidedModel(model, conditioning, latents.shape[0], guidance, rescale)

    def prompt_pair_model(
        self, calls: list[ModelCall], model: Callable, latents: torch.Tensor, scale: float | None, shared=()
    ) -> GuidedModel:
        """`GuidedModel` for the parents that call the denoiser twice per step under guidance, for the prompt, then
        the negative prompt (Flux's true CFG, Wan), combined as `neg + scale * (pos - neg)`: one batched call, the
        negative rows first. One recorded call (and `scale` None) is a step without guidance. `shared`: the
        conditioning with no batch axis (Flux's position ids), the same in both calls."""
        if len(calls) == 1:
            return GuidedModel(
                model, calls[0].conditioning(self.varying_inputs), latents.shape[0], None, shared=shared
            )
        positive, negative = (call.conditioning(self.varying_inputs) for call in calls)
        conditioning = {}
        for key, value in positive.items():
            other = negative[key]
            if key in shared or not isinstance(value, torch.Tensor):
                if not same_value(value, other):
                    raise ValueError(
                        f"{type(self).__name__} evaluates the prompt and the negative prompt in one batched call, so "
                        f"their `{key}` must be the same (for encoded prompts: the same sequence length)."
                    )
                conditioning[key] = value
                continue
            if len(other) == 1 < len(value):  # the parent's call broadcasts a single negative prompt
                other = other.expand(len(value), *other.shape[1:])
            if other.shape != value.shape:
                raise ValueError(
                    f"{type(self).__name__} evaluates the prompt and the negative prompt in one batched call, so "
                    f"their `{key}` must have the same shape, got {tuple(value.shape)} and {tuple(other.shape)} "
                    f"(prompts are padded to `max_sequence_length`; embeddings passed in must match)."
                )
            conditioning[key] = torch.cat([other, value])
        return GuidedModel(model, conditioning, latents.shape[0], scale, shared=shared)

    def unet_model(self, x, t, **conditioning):
        """One UNet call as the parents make it, on the rows of many steps."""
        return self.unet(x, t, return_dict=False, **conditioning)[0]

    def transformer_model(self, x, t, **conditioning):
        """One transformer call as the SD3 and Wan parents make it (the timestep per row), on many steps' rows."""
        return self.transformer(hidden_states=x, timestep=t, return_dict=False, **conditioning)[0]
