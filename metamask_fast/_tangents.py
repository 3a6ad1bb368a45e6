r"""Directional derivatives of a backbone's output with respect to its weights, reusing a recorded forward.

The exact second-order term of MetaMask needs :math:`\dot f = J_\theta f(\theta; x)\, v`, the derivative of the
backbone's features along a weight direction ``v``, at the weights of a forward that the step has already run
(step 2, at θ_{t+1}). :func:`torch.func.jvp` would run that forward again with tangents: a convolution costs
three convolutions there (the primal, ``conv(ẋ, W)`` and ``conv(x, Ẇ)``). Here the forward is run once
through a :mod:`torch.fx` trace of the backbone that keeps every intermediate value, and the tangents are
propagated afterwards node by node: convolutions and linear layers, bilinear in input and weight, cost their
two tangent terms only; every other node (BatchNorm, activations, pooling, additions, concatenations) goes
through :func:`torch.func.jvp` on its recorded inputs, which recomputes only that cheap node.

Rules that keep the replay equal to the forward:

- In-place operations (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x += y``) are
  recorded and differentiated out of place, so no recorded value is overwritten. That is the same function
  only when nothing reads the mutated tensor afterwards; :func:`trace_backbone` declines backbones where
  something does.
- Backbones that draw random numbers (dropout, RReLU, ``torch.rand*``, ``bernoulli``) are declined: a replay
  would draw anew.
- Weights are matched to their directions by identity, so tied weights get every term; attributes read with
  ``get_attr`` come from the live backbone, never from copies made at trace time.
- BatchNorm nodes differentiate the batch statistics (training mode) and update no running buffers.
- Half-precision recorded values (a ``bfloat16`` autocast forward) are used in the directions' precision.

Declined or untraceable backbones make :func:`trace_backbone` return None; the caller then differentiates
the whole forward with :func:`torch.func.jvp`.

Known limits: torch.fx itself traces ``a += b`` as ``a = a + b``, so a backbone that keeps an alias of
``a`` (``keep = a``) and reads it after ``a += b`` is traced unfaithfully, and no check here can see it; and
every op needs forward-mode AD in torch (``weight_norm`` has none), as the full jvp does too.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

_BILINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_IN_PLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_RANDOM_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
    torch.dropout, torch.bernoulli, torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
    torch.randint_like, torch.randperm, torch.normal, torch.multinomial, torch.poisson,
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_"}


class _NoTangent:
    """Marks a pytree leaf that has no tangent (None itself is a pytree node, not a leaf)."""


_NONE = _NoTangent()


@dataclass
class Trace:
    """A traced backbone: the graph, and the live module it was traced from."""

    graph_module: fx.GraphModule
    root: nn.Module

    def fetch(self, target: str):
        """An attribute of the live backbone by qualified name (a submodule, parameter or buffer)."""
        value = self.root
        for part in target.split("."):
            value = getattr(value, part)
        return value


def trace_backbone(backbone: nn.Module) -> Trace | None:
    """A trace of ``backbone`` for :func:`record_forward` and :func:`forward_tangent`, or None when the
    recorded-forward path does not apply (see the module docstring)."""
    if any(isinstance(m, _RANDOM_MODULES) for m in backbone.modules()):
        return None
    try:
        graph_module = fx.symbolic_trace(backbone)
    except Exception:  # noqa: BLE001  (any tracing failure means: use the fallback)
        return None
    trace = Trace(graph_module, backbone)
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _RANDOM_FUNCTIONS:
            return None
        if node.op == "call_method" and node.target in _RANDOM_METHODS:
            return None
        if _is_in_place(trace, node):
            mutated = node.args[0]
            # Out of place is the same function only if nothing reads the mutated tensor afterwards.
            if isinstance(mutated, fx.Node) and any(
                order[user] > order[node] for user in mutated.users if user is not node
            ):
                return None
    return trace


def _is_in_place(trace: Trace, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(trace.fetch(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", None) == "torch" and name.endswith("_") and not name.endswith("__"):
            return True
        return _bound_inplace(node.target, node.args, node.kwargs) is not None
    return False


def _bound_inplace(target, args, kwargs) -> inspect.BoundArguments | None:
    """The bound arguments of a call with ``inplace=True`` (F.relu(x, inplace=True) and the like)."""
    if kwargs.get("inplace") is True:
        return inspect.signature(target).bind(*args, **kwargs)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if "inplace" not in signature.parameters:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    return bound if bound.arguments.get("inplace") is True else None


def _out_of_place_call(target, args, kwargs):
    """``(target, args, kwargs)`` of a call_function with its in-place form replaced by the plain one."""
    if target in _IN_PLACE_OPERATORS:
        return _IN_PLACE_OPERATORS[target], args, kwargs
    name = getattr(target, "__name__", "")
    if getattr(target, "__module__", None) == "torch" and name.endswith("_") and not name.endswith("__"):
        if hasattr(torch, name[:-1]):
            return getattr(torch, name[:-1]), args, kwargs
    bound = _bound_inplace(target, args, kwargs)
    if bound is not None:
        bound.arguments["inplace"] = False
        return target, bound.args, bound.kwargs
    return target, args, kwargs


def _out_of_place_method(name: str, receiver) -> str:
    if name.endswith("_") and not name.endswith("__") and hasattr(receiver, name[:-1]):
        return name[:-1]
    return name


class _Recorder(fx.Interpreter):
    """Runs the trace on the live backbone and keeps every node's value, with in-place operations run out
    of place (see the module docstring)."""

    def __init__(self, trace: Trace):
        super().__init__(trace.graph_module, garbage_collect_values=False)
        self.trace = trace
        self._out_of_place: dict[str, nn.Module] = {}

    def fetch_attr(self, target: str):
        return self.trace.fetch(target)

    def call_module(self, target, args, kwargs):
        module = self.trace.fetch(target)
        if getattr(module, "inplace", False):
            if target not in self._out_of_place:
                twin = copy.copy(module)  # the same weights, but a separate `inplace` flag
                twin.inplace = False
                self._out_of_place[target] = twin
            module = self._out_of_place[target]
        return module(*args, **kwargs)

    def call_function(self, target, args, kwargs):
        target, args, kwargs = _out_of_place_call(target, args, kwargs)
        return target(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        return super().call_method(_out_of_place_method(target, args[0]), args, kwargs)


def record_forward(trace: Trace, x: torch.Tensor) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """The backbone's output on ``x`` (differentiable as usual) and the values of all its nodes."""
    recorder = _Recorder(trace)
    out = recorder.run(x)
    return out, recorder.env


def _floating(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def forward_tangent(trace: Trace, env: dict[fx.Node, object], directions: dict[str, torch.Tensor]):
    """The tangent of the recorded forward's output along ``directions`` (weight name in the backbone, as
    ``named_parameters`` gives it → direction; weights not named have tangent 0), or None when it is 0.
    Runs in the directions' precision; call it under ``torch.no_grad()``."""
    root = trace.root
    by_id = {id(p): directions[name] for name, p in root.named_parameters() if name in directions}
    dtype = next(iter(directions.values())).dtype if directions else torch.float32
    tangents: dict[fx.Node, object] = {}

    def primal_of(node: fx.Node):
        def prepare(value):
            if _floating(value):
                value = value.detach()
                if value.dtype in (torch.float16, torch.bfloat16) and dtype in (torch.float32, torch.float64):
                    value = value.to(dtype)
            return value

        return pytree.tree_map(prepare, env[node])

    def tangent_of(node: fx.Node):
        tangent = tangents.get(node)
        return pytree.tree_map(lambda _: _NONE, env[node]) if tangent is None else tangent

    for node in trace.graph_module.graph.nodes:
        if node.op == "placeholder":
            tangents[node] = None
        elif node.op == "get_attr":
            tangents[node] = by_id.get(id(trace.fetch(node.target)))
        elif node.op in ("call_module", "call_function", "call_method"):
            primal_args = fx.node.map_arg((node.args, node.kwargs), primal_of)
            tangent_args = fx.node.map_arg((node.args, node.kwargs), tangent_of)
            tangents[node] = _node_tangent(trace, node, primal_args, tangent_args, by_id, env[node])
        elif node.op == "output":
            result = tangents.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return result
    raise RuntimeError("the traced backbone has no output node")


def _node_tangent(trace: Trace, node: fx.Node, primal_args, tangent_args, by_id, recorded):
    (args, kwargs), (t_args, t_kwargs) = primal_args, tangent_args
    out_leaves, out_spec = pytree.tree_flatten(recorded)
    float_outputs = [i for i, leaf in enumerate(out_leaves) if _floating(leaf)]
    if not float_outputs:  # sizes, shapes, integer tensors: nothing to differentiate
        return None

    weights: dict[str, torch.Tensor] = {}
    weight_tangents: dict[str, torch.Tensor] = {}
    if node.op == "call_module":
        module = trace.fetch(node.target)
        for name, p in module.named_parameters(remove_duplicate=False):
            weights[name] = p.detach()
            if id(p) in by_id:
                weight_tangents[name] = by_id[id(p)]
        if _bilinear_applies(module, args, kwargs, t_args):
            return _bilinear_tangent(module, args[0], t_args[0], weights, weight_tangents, recorded)
        if _batch_norm_applies(module, args, kwargs):
            return _batch_norm_tangent(module, args[0], t_args[0], weights, weight_tangents)
        if type(module) is nn.ReLU and len(args) == 1 and not kwargs:
            return torch.ops.aten.threshold_backward(t_args[0], args[0], 0) if _floating(t_args[0]) else None
        buffers = batch_statistics_buffers(module)

        def call(*call_args, **call_kwargs):
            return functional_call(module, ({**weights, **call_weights[0]}, buffers), call_args, call_kwargs)

    elif node.op == "call_function":
        target, args, kwargs = _out_of_place_call(node.target, args, kwargs)

        def call(*call_args, **call_kwargs):
            return target(*call_args, **call_kwargs)

    else:
        name = _out_of_place_method(node.target, args[0])

        def call(*call_args, **call_kwargs):
            return getattr(call_args[0], name)(*call_args[1:], **call_kwargs)

    leaves, spec = pytree.tree_flatten((args, kwargs))
    tangent_leaves, _ = pytree.tree_flatten((t_args, t_kwargs))
    differentiated = [i for i, (p, t) in enumerate(zip(leaves, tangent_leaves)) if _floating(p) and _floating(t)]
    weight_names = list(weight_tangents)
    if not differentiated and not weight_names:
        return None
    call_weights = [{}]  # the weight values inside the transform (call_module only)

    def of_differentiated(weight_values, leaf_values):
        call_weights[0] = dict(zip(weight_names, weight_values))
        values = list(leaves)
        for i, value in zip(differentiated, leaf_values):
            values[i] = value
        call_args, call_kwargs = pytree.tree_unflatten(values, spec)
        out_values = pytree.tree_flatten(call(*call_args, **call_kwargs))[0]
        return tuple(out_values[i] for i in float_outputs)

    primals = (tuple(weights[n] for n in weight_names), tuple(leaves[i] for i in differentiated))
    tangent_values = (tuple(weight_tangents[n] for n in weight_names), tuple(tangent_leaves[i] for i in differentiated))
    _, out_tangents = torch.func.jvp(of_differentiated, primals, tangent_values)
    result: list[object] = [_NONE] * len(out_leaves)
    for i, tangent in zip(float_outputs, out_tangents):
        result[i] = tangent
    return pytree.tree_unflatten(result, out_spec)


def _bilinear_applies(module: nn.Module, args, kwargs, t_args) -> bool:
    """Whether the conv/linear shortcut applies: a plain (unparametrised) layer called on one tensor."""
    return (
        type(module) in _BILINEAR
        and not parametrize.is_parametrized(module)
        and len(args) == 1
        and not kwargs
        and isinstance(args[0], torch.Tensor)
    )


def _bilinear_tangent(module, x, dx, weights, weight_tangents, recorded):
    """out = op(x, W) + b: the tangent op(ẋ, W) + op(x, Ẇ) + ḃ, without the primal."""
    dw, db = weight_tangents.get("weight"), weight_tangents.get("bias")
    terms = []
    if _floating(dx):
        terms.append(_bilinear(module, dx, weights["weight"]))
    if dw is not None:
        terms.append(_bilinear(module, x, dw))
    if db is not None:
        shape = [-1] if isinstance(module, nn.Linear) else [1, -1] + [1] * (x.dim() - 2)
        terms.append(db.reshape(shape))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total.expand(recorded.shape) if total.shape != recorded.shape else total


def _batch_norm_applies(module: nn.Module, args, kwargs) -> bool:
    """BatchNorm normalising with batch statistics (training mode, or no running buffers), on one tensor."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.training or module.running_mean is None)
        and len(args) == 1
        and not kwargs
        and isinstance(args[0], torch.Tensor)
    )


def _batch_norm_tangent(module, x, dx, weights, weight_tangents):
    """y = γ x̂ + β with x̂ = (x - μ) / sqrt(σ² + ε) over the batch statistics of x. Per channel the Jacobian
    of y in x, γ r (I - 11ᵀ/N - x̂x̂ᵀ/N), is symmetric, so its product with ẋ is BatchNorm's own backward
    applied to ẋ (one fused kernel instead of a dozen elementwise ops); the weight terms add γ̇ x̂ + β̇,
    which is a batch norm of x with weight γ̇ and bias β̇ (which also yields the statistics)."""
    gamma = weights.get("weight")
    d_gamma, d_beta = weight_tangents.get("weight"), weight_tangents.get("bias")
    has_affine_tangent = d_gamma is not None or d_beta is not None
    channels = x.shape[1]
    if has_affine_tangent:
        d_gamma = d_gamma if d_gamma is not None else x.new_zeros(channels)
        d_beta = d_beta if d_beta is not None else x.new_zeros(channels)
    affine_term, mean, invstd = torch.native_batch_norm(
        x, d_gamma if has_affine_tangent else None, d_beta if has_affine_tangent else None, None, None, True, 0.0,
        module.eps,
    )
    result = affine_term if has_affine_tangent else None
    if _floating(dx):
        through_input = torch.ops.aten.native_batch_norm_backward(
            dx, x, gamma, None, None, mean, invstd, True, module.eps, [True, False, False]
        )[0]
        result = through_input if result is None else result + through_input
    return result


def _bilinear(module, x, weight):
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


def batch_statistics_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Buffers for :func:`functional_call` that make every BatchNorm in training mode normalise with batch
    statistics and update nothing (its running buffers replaced by None; what :func:`torch.func.jvp` needs,
    as it cannot update buffers in place); other buffers as they are."""
    buffers: dict[str, torch.Tensor | None] = dict(module.named_buffers())
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffers[f"{prefix}.{name}" if prefix else name] = None
    return buffers
