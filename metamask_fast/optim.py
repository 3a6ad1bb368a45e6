"""The network optimizers MetaMask unrolls (SGD, AdamW, LARS): their virtual updates and vector-Jacobian products.

MetaMask's virtual step is the network optimizer's own update ``θ' = U(θ, g)`` from the contrastive gradient
``g``, made without writing the optimizer's state (momentum buffers, Adam moments, step count); the mask's
hypergradient needs ``u = J_Uᵀ v``, the vector-Jacobian product of that update with respect to ``g``
(:mod:`metamask_fast.meta`). This module has both for the three optimizers :class:`~metamask_fast.meta.MetaMaskStep`
accepts: ``torch.optim.SGD`` (every option, any parameter groups), ``torch.optim.AdamW`` (not amsgrad) and
:class:`LARS`, official Barlow Twins' formulation. Both run through the compiled multi-tensor ops of
:func:`metamask_fast.ops.virtual_sgd_step` and :mod:`metamask_fast.optim_ops` (their fallbacks without the
extension); this module reads the optimizer's groups and state for them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from metamask_fast import ops, optim_ops
from metamask_fast._checks import check_number

__all__ = ["LARS", "check_network_optimizer", "virtual_update", "update_vjp", "sgd_vjp_factors"]


class LARS(torch.optim.Optimizer):
    """LARS as official Barlow Twins writes it (``facebookresearch/barlowtwins``, ``main.py``).

    Per parameter ``p`` with gradient ``g``: ``d = g + weight_decay·p`` (not for 1-d parameters when
    ``weight_decay_filter``), ``q = eta·‖p‖/‖d‖`` when both norms are > 0, else 1 (not for 1-d parameters
    when ``lars_adaptation_filter``: biases and norms), ``d = q·d``, ``mu = momentum·mu + d`` (state ``"mu"``,
    zeros at first), ``p = p − lr·mu``.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001,
                 weight_decay_filter: bool = False, lars_adaptation_filter: bool = False):
        lr = check_number("lr", lr, minimum=0)
        weight_decay = check_number("weight_decay", weight_decay, minimum=0)
        momentum = check_number("momentum", momentum, minimum=0)
        eta = check_number("eta", eta, minimum=0, strict=True)
        for name, value in (("weight_decay_filter", weight_decay_filter),
                            ("lars_adaptation_filter", lars_adaptation_filter)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = _lars_direction(group, p, p.grad)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


def _decays(group: dict, p: torch.Tensor) -> bool:
    return not (group["weight_decay_filter"] and p.ndim == 1)


def _adapts(group: dict, p: torch.Tensor) -> bool:
    return not (group["lars_adaptation_filter"] and p.ndim == 1)


def _lars_scale(group: dict, p: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q = eta·‖p‖/‖d‖`` when both norms are > 0, else 1, and whether they are (0-d tensors: no host sync)."""
    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
    one = torch.ones_like(param_norm)
    return torch.where(param_norm > 0, torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                       one), (param_norm > 0) & (update_norm > 0)


def _lars_direction(group: dict, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``q·d`` of the LARS update for gradient ``g``."""
    d = g.add(p, alpha=group["weight_decay"]) if _decays(group, p) else g
    return d.mul(_lars_scale(group, p, d)[0]) if _adapts(group, p) else d


# ---------------------------------------------------------------------------------------------- the rules


_ACCEPTED = "torch.optim.SGD, torch.optim.AdamW or metamask_fast.optim.LARS"


def _kind(optimizer: torch.optim.Optimizer) -> str:
    # AdamW first: recent torch makes it a subclass of Adam, which is refused.
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, LARS):
        return "lars"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


def check_network_optimizer(optimizer: object) -> None:
    """Refuse an optimizer whose update the virtual step cannot unroll, with the reason."""
    kind = _kind(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else "other"
    if kind == "other":
        raise TypeError(f"net_optimizer must be {_ACCEPTED}: the virtual step of MetaMask is the network "
                        f"optimizer's update, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("net_optimizer: maximize=True is not supported by the virtual step")
        if kind == "adamw" and group.get("amsgrad", False):
            raise ValueError("net_optimizer: AdamW with amsgrad=True is not supported by the virtual step "
                             "(its running maximum makes the update non-smooth in the gradient); use amsgrad=False")


def _value(x) -> float:
    return float(x) if isinstance(x, torch.Tensor) else x


def virtual_update(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor],
                   grads: Sequence[torch.Tensor | None],
                   out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """θ' of every parameter of ``group`` (``params``, their ``grads``; None: no gradient, θ' = θ): the update
    ``optimizer`` would make, without writing its state, through the compiled ops of
    :mod:`metamask_fast.optim_ops`. Tensors that do not require grad: ``out`` (one per parameter with a
    gradient, in order) where given, else new ones; the parameters without a gradient themselves, detached."""
    result = [p.detach() for p in params]
    stepped = [i for i, g in enumerate(grads) if g is not None]
    if not stepped:
        return result
    ps, gs = [params[i] for i in stepped], [grads[i] for i in stepped]
    for i, new in zip(stepped, _update(optimizer, group, ps, gs, out)):
        result[i] = new
    return result


def _update(optimizer, group, ps, gs, out) -> list[torch.Tensor]:
    kind, state = _kind(optimizer), optimizer.state
    if kind == "sgd":
        return ops.virtual_sgd_step(
            ps, gs, [state[p].get("momentum_buffer") for p in ps], lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"], out=out)
    if kind == "lars":
        return optim_ops.virtual_lars_step(ps, gs, [state[p].get("mu") for p in ps], out=out, **_lars_options(group))
    return optim_ops.virtual_adamw_step(
        ps, gs, *_adamw_state(optimizer, ps), lr=group["lr"], betas=group["betas"], eps=group["eps"],
        weight_decay=group["weight_decay"], out=out)


def _lars_options(group: dict, momentum: bool = True) -> dict:
    options = {key: group[key] for key in ("lr", "weight_decay", "eta", "weight_decay_filter",
                                           "lars_adaptation_filter")}
    if momentum:
        options["momentum"] = group["momentum"]
    return options


def _adamw_state(optimizer: torch.optim.Optimizer, ps: list[torch.Tensor]) -> tuple[list, list, list[float]]:
    """AdamW's moments (None before the first step) and the number of the step being made, per parameter."""
    state = optimizer.state
    return ([state[p].get("exp_avg") for p in ps], [state[p].get("exp_avg_sq") for p in ps],
            [_value(state[p].get("step", 0)) + 1 for p in ps])


def sgd_vjp_factors(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor]) -> list[float]:
    """For SGD, ``J_Uᵀ v = f·v`` per parameter (:func:`metamask_fast.optim_ops.sgd_vjp_factor`)."""
    lr = _value(group["lr"])
    return [optim_ops.sgd_vjp_factor(lr, group["momentum"], group["dampening"], group["nesterov"],
                                     optimizer.state[p].get("momentum_buffer") is not None) for p in params]


def update_vjp(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor | None], vectors: Sequence[torch.Tensor | None],
               out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
    """``u = J_Uᵀ v`` per parameter of ``group``: the vector-Jacobian product of :func:`virtual_update` with
    respect to the gradient, at ``grads``, for ``vectors`` (None where no gradient or no vector), through the
    compiled ops of :mod:`metamask_fast.optim_ops`; into ``out`` (one per parameter with both, in order)
    where given."""
    result: list[torch.Tensor | None] = [None] * len(params)
    both = [i for i, (g, v) in enumerate(zip(grads, vectors)) if g is not None and v is not None]
    if not both:
        return result
    ps, gs, vs = ([lst[i] for i in both] for lst in (params, grads, vectors))
    for i, u in zip(both, _vjp(optimizer, group, ps, gs, vs, out)):
        result[i] = u
    return result


def _vjp(optimizer, group, ps, gs, vs, out) -> list[torch.Tensor]:
    kind, state = _kind(optimizer), optimizer.state
    if kind == "sgd":
        return optim_ops.sgd_vjp(vs, [state[p].get("momentum_buffer") for p in ps], lr=group["lr"],
                                 momentum=group["momentum"], dampening=group["dampening"],
                                 nesterov=group["nesterov"], out=out)
    if kind == "lars":
        return optim_ops.lars_vjp(ps, gs, vs, out=out, **_lars_options(group, momentum=False))
    return optim_ops.adamw_vjp(gs, *_adamw_state(optimizer, ps), vs, lr=group["lr"], betas=group["betas"],
                               eps=group["eps"], out=out)
