r"""Directional derivatives of a backbone's output with respect to its weights, reusing a recorded forward.

The exact second-order term of MetaMask needs :math:`\dot f = J_\theta f(\theta; x)\, v`, the derivative of the
backbone's features along a weight direction ``v``, at the weights of a forward that the step has already run
(step 2, at θ_{t+1}). :func:`torch.func.jvp` would run that forward again with tangents: a convolution costs
three convolutions there (the primal, ``conv(ẋ, W)`` and ``conv(x, Ẇ)``). Here the forward is run once
through a :mod:`torch.fx` trace of the backbone that keeps every intermediate value, and the tangents are
propagated afterwards node by node: convolutions and linear layers, bilinear in input and weight, cost their
two tangent terms only; every other node (BatchNorm, activations, pooling, additions) goes through
:func:`torch.func.jvp` on its recorded inputs, which recomputes only that cheap node.

BatchNorm nodes differentiate the batch statistics (training mode) and update no running buffers there.
Backbones that :func:`torch.fx.symbolic_trace` cannot trace are reported by :func:`trace_backbone` returning
None; the caller then differentiates the whole forward with :func:`torch.func.jvp`.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

_BILINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_IN_PLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                     torch.dropout, torch.bernoulli, torch.rand, torch.rand_like, torch.randn, torch.randn_like}


def trace_backbone(backbone: nn.Module) -> fx.GraphModule | None:
    """An :mod:`torch.fx` trace of ``backbone`` that shares its modules and weights, or None when the
    recorded-forward path does not apply: the backbone cannot be traced (data-dependent control flow, say),
    or it draws random numbers (dropout), which a node-by-node replay would draw anew."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in backbone.modules()):
        return None
    try:
        traced = fx.symbolic_trace(backbone)
    except Exception:  # noqa: BLE001  (any tracing failure means: use the fallback)
        return None
    if any(node.op == "call_function" and node.target in _RANDOM_FUNCTIONS for node in traced.graph.nodes):
        return None
    return traced


class _Recorder(fx.Interpreter):
    """Runs the trace and keeps every node's value. In-place operations run out of place, so that no
    recorded value is overwritten later in the forward (the result is the same)."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module, garbage_collect_values=False)
        self._out_of_place: dict[str, nn.Module] = {}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if getattr(module, "inplace", False):
            if target not in self._out_of_place:
                twin = copy.copy(module)  # the same weights, but a separate `inplace` flag
                twin.inplace = False
                self._out_of_place[target] = twin
            module = self._out_of_place[target]
        return module(*args, **kwargs)

    def call_function(self, target, args, kwargs):
        return _IN_PLACE_FUNCTIONS.get(target, target)(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        if target.endswith("_") and not target.endswith("__") and hasattr(args[0], target[:-1]):
            target = target[:-1]
        return super().call_method(target, args, kwargs)


def record_forward(graph_module: fx.GraphModule, x: torch.Tensor) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """The backbone's output on ``x`` (differentiable as usual) and the values of all its nodes."""
    recorder = _Recorder(graph_module)
    out = recorder.run(x)
    return out, recorder.env


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _jvp_of(fn, primal_args, tangent_args):
    """Tangent of ``fn(*args)`` where only tensor entries of ``primal_args`` carry tangents (None: zero)."""
    leaves = [i for i, a in enumerate(primal_args) if _is_tensor(a) and tangent_args[i] is not None]
    if not leaves:
        return None

    def of_leaves(*values):
        args = list(primal_args)
        for i, value in zip(leaves, values):
            args[i] = value
        return fn(*args)

    _, tangent = torch.func.jvp(of_leaves, tuple(primal_args[i] for i in leaves), tuple(tangent_args[i] for i in leaves))
    return tangent


def _flatten(args, kwargs):
    """Positional and keyword arguments as one flat list, and a function that rebuilds them."""
    names = list(kwargs)
    flat = list(args) + [kwargs[n] for n in names]

    def rebuild(values):
        return values[: len(args)], dict(zip(names, values[len(args) :]))

    return flat, rebuild


def _module_tangent(module: nn.Module, prefix: str, inputs, input_tangents, directions):
    """Tangent of ``module(*inputs)`` along the input tangents and the directions of its own weights."""
    weights = {name: p.detach() for name, p in module.named_parameters(recurse=True)}
    weight_tangents = {name: directions.get(f"{prefix}.{name}" if prefix else name) for name in weights}
    if isinstance(module, _BILINEAR) and len(inputs) == 1:
        # out = op(x, W) + b: the tangent is op(ẋ, W) + op(x, Ẇ) + ḃ, without the primal.
        (x,), (dx,) = inputs, input_tangents
        dw, db = weight_tangents.get("weight"), weight_tangents.get("bias")
        terms = []
        if dx is not None:
            terms.append(_bilinear(module, dx, weights["weight"]))
        if dw is not None:
            terms.append(_bilinear(module, x, dw))
        if db is not None:
            shape = [1, -1] + [1] * (x.dim() - 2) if not isinstance(module, nn.Linear) else [-1]
            terms.append(db.reshape(shape))
        return _sum(terms)

    # Anything else: torch.func.jvp of this one module on its recorded inputs. BatchNorm normalises with
    # the batch statistics of training mode and updates no running buffers (they are passed as None).
    buffers = _buffers_without_running_statistics(module)
    differentiated = [name for name, t in weight_tangents.items() if t is not None]
    leaves = [i for i, (a, t) in enumerate(zip(inputs, input_tangents)) if _is_tensor(a) and t is not None]
    if not differentiated and not leaves:
        return None

    def run(weight_values, input_values):
        args = list(inputs)
        for i, value in zip(leaves, input_values):
            args[i] = value
        state = {**weights, **dict(zip(differentiated, weight_values)), **buffers}
        return functional_call(module, state, tuple(args))

    primals = (tuple(weights[n] for n in differentiated), tuple(inputs[i] for i in leaves))
    tangents = (tuple(weight_tangents[n] for n in differentiated), tuple(input_tangents[i] for i in leaves))
    return torch.func.jvp(run, primals, tangents)[1]


def _bilinear(module, x, weight):
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


def _sum(terms):
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _buffers_without_running_statistics(module: nn.Module) -> dict[str, torch.Tensor | None]:
    buffers: dict[str, torch.Tensor | None] = dict(module.named_buffers())
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffers[f"{prefix}.{name}" if prefix else name] = None
    return buffers


def forward_tangent(
    graph_module: fx.GraphModule, env: dict[fx.Node, object], directions: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The tangent of the recorded forward's output along ``directions`` (weight name in the backbone →
    direction; weights not named have tangent 0). Run under ``torch.no_grad()``."""
    tangents: dict[fx.Node, object] = {}

    def primal(a):
        return fx.node.map_arg(a, lambda n: _detach(env[n]))

    def tangent(a):
        return fx.node.map_arg(a, lambda n: tangents.get(n))

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            tangents[node] = None
        elif node.op == "get_attr":
            tangents[node] = directions.get(node.target)
        elif node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            tangents[node] = _module_tangent(
                module, node.target, list(primal(node.args)), list(tangent(node.args)), directions
            )
        elif node.op in ("call_function", "call_method"):
            flat, rebuild = _flatten(primal(node.args), primal(node.kwargs))
            flat_tangents, _ = _flatten(tangent(node.args), tangent(node.kwargs))
            target = _IN_PLACE_FUNCTIONS.get(node.target, node.target)
            if node.op == "call_method":
                name = target[:-1] if target.endswith("_") and not target.endswith("__") else target

                def fn(*values, _name=name):
                    args, kwargs = rebuild(list(values))
                    return getattr(args[0], _name)(*args[1:], **kwargs)
            else:

                def fn(*values, _target=target):
                    args, kwargs = rebuild(list(values))
                    return _target(*args, **kwargs)

            tangents[node] = _jvp_of(fn, flat, flat_tangents)
        elif node.op == "output":
            return tangent(node.args[0])
    raise RuntimeError("the traced backbone has no output node")


def _detach(value):
    return value.detach() if _is_tensor(value) else value
