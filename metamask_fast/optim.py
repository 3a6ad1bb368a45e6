"""The network optimizers MetaMask unrolls (SGD, AdamW, LARS): their virtual updates and vector-Jacobian products.

MetaMask's virtual step is the network optimizer's own update ``θ' = U(θ, g)`` from the contrastive gradient
``g``, made without writing the optimizer's state (momentum buffers, Adam moments, step count); the mask's
hypergradient needs ``u = J_Uᵀ v``, the vector-Jacobian product of that update with respect to ``g``
(:mod:`metamask_fast.meta`). This module has both for the three optimizers :class:`~metamask_fast.meta.MetaMaskStep`
accepts: ``torch.optim.SGD`` (every option, any parameter groups), ``torch.optim.AdamW`` (not amsgrad) and
:class:`LARS`, official Barlow Twins' formulation. The SGD update runs through the compiled
:func:`metamask_fast.ops.virtual_sgd_step`; the AdamW and LARS updates and every VJP are PyTorch here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from metamask_fast import ops
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
                   grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """θ' of every parameter of ``group`` (``params``, their ``grads``; None: no gradient, θ' = θ): the update
    ``optimizer`` would make, without writing its state. New tensors that do not require grad."""
    kind, state = _kind(optimizer), optimizer.state
    if kind == "sgd":
        return ops.virtual_sgd_step(
            params, grads, [state[p].get("momentum_buffer") for p in params], lr=group["lr"],
            momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"])
    out = []
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                out.append(p.detach())
            elif kind == "lars":
                mu = state[p].get("mu")
                d = _lars_direction(group, p, g)
                new_mu = d if mu is None else mu.mul(group["momentum"]).add_(d)
                out.append(p.detach().sub(new_mu, alpha=group["lr"]))
            else:
                out.append(_adamw_update(group, state[p], p.detach(), g))
    return out


def _adamw_moments(group: dict, state: dict, g: torch.Tensor):
    """The first and second moments after gradient ``g`` and the step number, from ``state`` (zeros at first)."""
    beta1, beta2 = group["betas"]
    step = _value(state.get("step", 0)) + 1
    m = state.get("exp_avg")
    s = state.get("exp_avg_sq")
    m = g.mul(1 - beta1) if m is None else m.mul(beta1).add_(g, alpha=1 - beta1)
    s = g.mul(g).mul_(1 - beta2) if s is None else s.mul(beta2).addcmul_(g, g, value=1 - beta2)
    return m, s, step


def _adamw_update(group: dict, state: dict, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    beta1, beta2 = group["betas"]
    lr, eps = _value(group["lr"]), group["eps"]
    m, s, step = _adamw_moments(group, state, g)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    denominator = s.sqrt().div_(math.sqrt(bias2)).add_(eps)
    return p.mul(1 - lr * group["weight_decay"]).addcdiv_(m, denominator, value=-lr / bias1)


def sgd_vjp_factors(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor]) -> list[float]:
    """For SGD, ``J_Uᵀ v = f·v`` per parameter: ``f = −lr·c``, ``c`` the weight of the gradient in the step
    (``1−dampening`` with a momentum buffer, ``1+momentum·(1−dampening)`` with nesterov; on the first step,
    without a buffer, ``1``, or ``1+momentum`` with nesterov; ``1`` without momentum)."""
    lr, momentum, dampening = _value(group["lr"]), group["momentum"], group["dampening"]
    factors = []
    for p in params:
        if momentum == 0:
            c = 1.0
        elif optimizer.state[p].get("momentum_buffer") is None:
            c = 1.0 + momentum if group["nesterov"] else 1.0
        else:
            c = 1.0 + momentum * (1.0 - dampening) if group["nesterov"] else 1.0 - dampening
        factors.append(-lr * c)
    return factors


def update_vjp(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor | None],
               vectors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``u = J_Uᵀ v`` per parameter of ``group``: the vector-Jacobian product of :func:`virtual_update` with
    respect to the gradient, at ``grads``, for ``vectors`` (None where no gradient or no vector)."""
    kind, state = _kind(optimizer), optimizer.state
    if kind == "sgd":
        factors = sgd_vjp_factors(optimizer, group, params)
        return [None if v is None or g is None else v * f for f, g, v in zip(factors, grads, vectors)]
    out = []
    with torch.no_grad():
        for p, g, v in zip(params, grads, vectors):
            if v is None or g is None:
                out.append(None)
            elif kind == "lars":
                out.append(_lars_vjp(group, p.detach(), g, v))
            else:
                out.append(_adamw_vjp(group, state[p], g, v))
    return out


def _lars_vjp(group: dict, p: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``−lr·J_{q(d)·d}ᵀ v``: with ``q = eta·‖p‖/‖d‖``, ``J = q·(I − d dᵀ/‖d‖²)``; the identity where ``q`` is 1."""
    lr = _value(group["lr"])
    if not _adapts(group, p):
        return v.mul(-lr)
    d = g.add(p, alpha=group["weight_decay"]) if _decays(group, p) else g
    q, adaptive = _lars_scale(group, p, d)
    squared = torch.linalg.vector_norm(d).square()
    projection = torch.where(adaptive, torch.sum(d * v) / squared.where(adaptive, torch.ones_like(squared)),
                             torch.zeros_like(squared))
    return v.sub(d * projection).mul_(q * -lr)


def _adamw_vjp(group: dict, state: dict, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The AdamW update's Jacobian is diagonal: ``∂θ'/∂g = −lr/b₁ · ((1−β₁)/D − m·(1−β₂)·g / (b₂·σ·D²))``
    with ``σ = sqrt(s/b₂)`` and ``D = σ + eps`` (the second part 0 where ``s`` is 0)."""
    beta1, beta2 = group["betas"]
    lr, eps = _value(group["lr"]), group["eps"]
    m, s, step = _adamw_moments(group, state, g)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    sigma = s.div(bias2).sqrt_()
    denominator = sigma + eps
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    curvature = torch.where(sigma > 0, m * (1 - beta2) * g / (bias2 * safe_sigma * denominator.square()),
                            torch.zeros_like(sigma))
    return v * ((1 - beta1) / denominator - curvature) * (-lr / bias1)
