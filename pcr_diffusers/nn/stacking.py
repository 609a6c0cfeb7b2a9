"""Stacking L layers of one architecture so that all of them run in one batched call.

`LayerStack` checks that the layers can be stacked, gathers their parameters and buffers into tensors with the layer
axis first, `(L, *param_shape)`, and evaluates `f_l(x_{l-1})` for many layers at once with
`torch.func.functional_call` on the first layer (the template) under `torch.func.vmap` over the layer axis.
"""

import torch
from torch import nn

# Modules whose output for one sample depends on the other samples or on fresh random numbers: a Newton iteration
# re-evaluates every layer many times and treats samples as independent, so these cannot be solved in parallel.
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_DROPOUTS = (nn.modules.dropout._DropoutNd,)


def _signature(layer: nn.Module) -> dict[str, object]:
    """Everything that must be equal across layers for a functional call of the template to stand in for `layer`.

    The template supplies the module types and their plain attributes (sizes, `eps`, activation slopes, the
    training flag); only parameters and buffers are swapped in per layer, so those need equal shapes and dtypes.
    """
    signature = {}
    for path, module in layer.named_modules(remove_duplicate=False):
        where = path or "the layer itself"
        signature[f"type of {where}"] = type(module).__qualname__
        for name, value in sorted(vars(module).items()):
            if not name.startswith("_"):
                signature[f"attribute {where}.{name}"] = repr(value)
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in tensors.items():
                spec = None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)
                signature[f"{kind} {where}.{name}"] = spec
    return signature


def _check_per_sample(index: int, layer: nn.Module) -> None:
    """Refuses modules that couple the samples of a batch, draw random numbers, or carry per-layer hooks."""
    for path, module in layer.named_modules():
        where = f"layer {index}" + (f" ({path})" if path else "")
        if isinstance(module, _BATCH_NORMS) and (module.training or module.running_mean is None):
            raise ValueError(
                f"`layers`: {where} is a {type(module).__name__} that normalises with batch statistics, which "
                "couples the samples of a batch; call .eval() (with running statistics) or use mode='sequential'."
            )
        if isinstance(module, _DROPOUTS) and module.training and module.p > 0:
            raise ValueError(
                f"`layers`: {where} is a {type(module).__name__} in training mode, which draws new random numbers "
                "on every call, so Newton's repeated evaluations are not one chain; call .eval() or use "
                "mode='sequential'."
            )
        if module._forward_hooks or module._forward_pre_hooks:
            raise ValueError(
                f"`layers`: {where} has forward hooks, which a stacked call of all layers cannot run per layer; "
                "remove them or use mode='sequential'."
            )


class LayerStack:
    """L layers of one architecture, evaluated all at once.

    Args:
        layers: the modules `f_1, ..., f_L`; each maps a state `(batch, *state)` to a state of the same shape,
            acting on each sample independently.

    Raises:
        ValueError: naming the first layer and the first attribute, parameter or buffer that differs from layer 0,
            or a module that cannot be stacked (BatchNorm with batch statistics, Dropout in training mode, hooks).
    """

    def __init__(self, layers: list[nn.Module]):
        if not layers:
            raise ValueError("`layers` must hold at least one module to stack.")
        reference = _signature(layers[0])
        for index, layer in enumerate(layers):
            signature = reference if index == 0 else _signature(layer)
            for key in [*reference, *(key for key in signature if key not in reference)]:
                if reference.get(key) != signature.get(key):
                    raise ValueError(
                        f"`layers` must share one architecture to be stacked, but layer {index} differs from layer 0 "
                        f"in {key}: {signature.get(key)} vs {reference.get(key)}. Use mode='sequential' for mixed "
                        "stacks."
                    )
            _check_per_sample(index, layer)
        self.template = layers[0]
        # (owning submodule per layer, local name): looked up afresh on every call, so the stack always sees
        # parameters that were replaced or updated in place after it was built.
        self._params = self._owners(layers, layers[0].named_parameters())
        self._buffers = self._owners(layers, layers[0].named_buffers())

    @staticmethod
    def _owners(layers, named_tensors) -> dict[str, tuple[list[nn.Module], str]]:
        owners = {}
        for name, _ in named_tensors:
            path, _, local = name.rpartition(".")
            owners[name] = ([layer.get_submodule(path) for layer in layers], local)
        return owners

    def parameters(self) -> dict[str, torch.Tensor]:
        """The layers' parameters stacked, `{name: (L, *shape)}`; differentiable into each layer's own tensor."""
        return {
            name: torch.stack([m._parameters[local] for m in owners]) for name, (owners, local) in self._params.items()
        }

    def buffers(self) -> dict[str, torch.Tensor]:
        """The layers' buffers stacked, `{name: (L, *shape)}`."""
        return {
            name: torch.stack([m._buffers[local] for m in owners]) for name, (owners, local) in self._buffers.items()
        }

    def evaluate(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        """`f_l(x_l)` for n layers at once: stacked `params`/`buffers` `(n, ...)`, `x` `(n, batch, *state)` -> same."""

        def one_layer(p, b, x_l):
            return torch.func.functional_call(self.template, (p, b), (x_l,))

        out = torch.func.vmap(one_layer)(params, buffers, x)
        if out.shape != x.shape:
            raise ValueError(
                f"`layers` must map a state (batch, *state) to the same shape; on input {tuple(x.shape[1:])} a layer "
                f"returned {tuple(out.shape[1:])}."
            )
        return out
