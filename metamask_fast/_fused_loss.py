"""The fused Triton Barlow Twins loss as ``torch.library`` custom ops with autograd.

``metamask_fast::barlow_twins_fused`` runs the forward kernels of :mod:`metamask_fast.kernels.barlow_twins`
and returns the loss with the float32 statistics the backward needs; ``metamask_fast::barlow_twins_fused_backward``
runs the backward kernels. Both have fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them as opaque ops. This module imports Triton, so :mod:`metamask_fast.functional` imports it only
when the Triton backend is used (``TRITON_INTERPRET=1`` must be set before that first use to run the
kernels on the CPU).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from metamask_fast.kernels import barlow_twins as kernels

SUPPORTED_DTYPES = kernels.SUPPORTED_DTYPES


def kernels_run_on_cpu() -> bool:
    """Whether the kernels were built by Triton's interpreter (``TRITON_INTERPRET=1``), which runs CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._column_stats_kernel, InterpretedFunction)


def _launch_device(device: torch.device):
    """The context to launch kernels for tensors on ``device`` in: Triton launches on the *current* CUDA
    device, with its current stream, whatever device the tensors are on, and ``torch.library.custom_op``
    adds no guard. Tensors on ``cuda:1`` while ``cuda:0`` is current (``model.to(rank)`` without
    ``torch.cuda.set_device`` under torchrun) would otherwise meet an illegal memory access or a race."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _float32_like(z: Tensor, *shape: int) -> Tensor:
    return z.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("metamask_fast::barlow_twins_fused", mutates_args=())
def barlow_twins_fused(
    z_a: Tensor, z_b: Tensor, weight: Tensor | None, lambd: float, unbiased: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b)``, all float32; see the kernels module."""
    with _launch_device(z_a.device):
        loss, *saved = kernels.barlow_twins_forward(z_a, z_b, weight, lambd, unbiased, eps)
    return (loss, *saved)


@barlow_twins_fused.register_fake
def _barlow_twins_fused_fake(z_a, z_b, weight, lambd, unbiased, eps):
    n, d = z_a.shape
    # Gram path: the two N × N Gram matrices; tiled C path: K = bᵀa (D × D) and an empty tensor.
    saved_matrices = ((n, n), (n, n)) if kernels.use_gram_path(n, d) else ((d, d), (0,))
    return (
        _float32_like(z_a),
        *(_float32_like(z_a, d) for _ in range(5)),
        *(_float32_like(z_a, *shape) for shape in saved_matrices),
    )


@torch.library.custom_op("metamask_fast::barlow_twins_fused_backward", mutates_args=())
def barlow_twins_fused_backward(
    grad_loss: Tensor,
    z_a: Tensor,
    z_b: Tensor,
    weight: Tensor | None,
    lambd: float,
    unbiased: bool,
    mean_a: Tensor,
    rstd_a: Tensor,
    mean_b: Tensor,
    rstd_b: Tensor,
    diag: Tensor,
    gram_a: Tensor,
    gram_b: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂/∂z_a, ∂/∂z_b, ∂/∂weight)``; the last is empty when ``weight`` is None."""
    saved = (mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b)
    grad_loss = grad_loss.to(torch.float32).contiguous()
    with _launch_device(z_a.device):
        grad_a, grad_b, grad_w = kernels.barlow_twins_backward(grad_loss, z_a, z_b, weight, lambd, unbiased, saved)
    return grad_a, grad_b, grad_w if grad_w is not None else z_a.new_empty(0)


@barlow_twins_fused_backward.register_fake
def _barlow_twins_fused_backward_fake(grad_loss, z_a, z_b, weight, lambd, unbiased, *saved):
    grad_w = torch.empty_like(weight) if weight is not None else z_a.new_empty(0)
    return z_a.new_empty(z_a.shape), z_b.new_empty(z_b.shape), grad_w


def _setup_context(ctx, inputs, output):
    z_a, z_b, weight, lambd, unbiased, _eps = inputs
    ctx.save_for_backward(z_a, z_b, weight, *output[1:])
    ctx.lambd, ctx.unbiased = lambd, unbiased
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    z_a, z_b, weight, *saved = ctx.saved_tensors
    grad_a, grad_b, grad_w = barlow_twins_fused_backward(
        grad_loss, z_a, z_b, weight, ctx.lambd, ctx.unbiased, *saved
    )
    return grad_a, grad_b, grad_w if weight is not None else None, None, None, None


barlow_twins_fused.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "barlow_twins_loss(backend='triton') has no second derivative (a backward with create_graph=True "
        "through its gradient); use backend='torch', whose backward is differentiable"
    )


barlow_twins_fused_backward.register_autograd(_no_double_backward)
