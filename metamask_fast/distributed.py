"""Multi-process training (``torchrun``) on PyTorch's own distributed runtime.

Every rank holds a full model and a slice of the global batch (the global batch is the concatenation of the
ranks' local batches in rank order). The training steps (``MetaMaskStep(..., distributed=True)``,
``SingleLossStep(..., distributed=True)``) compute every loss on embeddings gathered from all ranks
(:func:`gather`) and average every gradient over the ranks (:func:`average_gradients`) before using it;
BatchNorm layers converted by :func:`convert_sync_batchnorm` normalise with the statistics of the global
batch. Together the ranks then take the step one process would take on the global batch.

Gradient scaling: the collectives here are differentiated with *sum* semantics, the exact chain rule of
the sum over ranks of what each rank computes. Every rank computes the same global loss ``L``, so the
ranks' gradients add up to ``world_size · ∇L``, and :func:`average_gradients` (a mean over ranks) gives
``∇L`` on every rank.

::

    ctx = init_from_env("cuda")                 # torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...
    model = convert_sync_batchnorm(model).to(ctx.device)
    broadcast_module(model)                     # every rank starts from rank 0's weights
    ...
    shutdown()
"""

from __future__ import annotations

import io
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DistContext",
    "SyncBatchNorm",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "convert_sync_batchnorm",
    "gather",
    "init_from_env",
    "is_initialized",
    "shutdown",
]


# torch >= 2.14 names them *_single (the *_tensor names are deprecated there); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its ``rank`` among ``world_size`` processes, its ``local_rank`` on its
    node, whether a process group is up (``is_distributed``) and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    is_distributed: bool
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0


def is_initialized() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set (run under torchrun, or leave WORLD_SIZE unset)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(device: str, *, init_method: str | None = None) -> DistContext:
    """Set up the process group from torchrun's environment.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised: rank 0 of 1 on ``device``. Otherwise the default
    process group is initialised from ``RANK`` and ``WORLD_SIZE`` (``init_method``, default ``"env://"``:
    ``MASTER_ADDR`` and ``MASTER_PORT``), with NCCL for a CUDA ``device`` (which becomes
    ``cuda:LOCAL_RANK``, made the current device) and Gloo for the CPU. A group that is already up is used
    as it is.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    kind = torch.device(device).type
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return DistContext(rank=0, world_size=1, local_rank=0, is_distributed=False, device=device)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this build of torch has no torch.distributed")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK must be in [0, {world_size}), got {rank}")
    if kind == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: LOCAL_RANK={local_rank} needs cuda:{local_rank}, but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA devices are visible"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend, device_id = "nccl", torch.device(device)
    elif kind == "cpu":
        backend, device_id = "gloo", None
    else:
        raise ValueError(f"device must be a cpu or cuda device for distributed training, got {device!r}")
    if not dist.is_initialized():
        if init_method is None:
            # env:// through a key namespace of this start of the group alone (see _fresh_namespace).
            (store, _, _) = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=_TIMEOUT))
            store = dist.PrefixStore(f"metamask_fast/{_fresh_namespace(store, rank, world_size)}/", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    device_id=device_id)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, is_distributed=True,
        device=device,
    )


_TIMEOUT = timedelta(minutes=30)  # for the store and the start-up handshake: torch's default for Gloo


def _fresh_namespace(store: dist.Store, rank: int, world_size: int) -> str:
    """A name that every rank of this start of the group agrees on and that no earlier start used, for the keys
    of the process group in ``store``.

    torchrun (``--max-restarts``) keeps one store for all the starts of a group, and each start's process group
    writes the same keys: the Gloo address of each rank among them. A rank of a restarted group could read the
    address of a process of the killed start and fail at once (``connectFullMesh ... Connection refused``),
    wasting a restart. TORCHELASTIC_RESTART_COUNT cannot name the start: it counts one agent's restarts, and on
    another node a group restarted for a membership change keeps its count. So rank 0 draws a random token, and
    every other rank draws a random nonce, posts it, and waits for the token under a key made of its own nonce,
    which no earlier process can have written; rank 0 answers every nonce it sees posted (an earlier process's
    too, harmlessly) until each rank has acknowledged the token under a key made of the token."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"metamask_fast/join/{rank}", nonce)
        grant = f"metamask_fast/grant/{nonce}"
        store.wait([grant], _TIMEOUT)
        token = store.get(grant).decode()
        store.set(f"metamask_fast/ack/{token}/{rank}", "1")
        return token
    token = uuid.uuid4().hex
    pending = set(range(1, world_size))
    deadline = time.monotonic() + _TIMEOUT.total_seconds()
    while pending:
        for other in sorted(pending):
            join = f"metamask_fast/join/{other}"
            if store.check([join]):
                store.set(f"metamask_fast/grant/{store.get(join).decode()}", token)
            if store.check([f"metamask_fast/ack/{token}/{other}"]):
                pending.discard(other)
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(pending)} did not join within {_TIMEOUT}")
            time.sleep(0.01)
    return token


def broadcast_object(obj: Any, device: str = "cpu") -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` elsewhere is ignored): saved with ``torch.save`` on rank 0, sent
    as bytes (through ``device``, a CUDA device under NCCL) and loaded with ``torch.load(weights_only=True)``, so
    it may hold what a checkpoint holds. ``obj`` itself when not distributed."""
    if _world_size() == 1:
        return obj
    payload = b""
    if dist.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if payload
            else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(data, src=0)
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


def shutdown() -> None:
    """Destroy the default process group, if one is up."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; nothing when not distributed."""
    if not is_initialized():
        return
    if dist.get_backend() == dist.Backend.NCCL:
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# --------------------------------------------------------------------------------------------- gather


class _Gather(torch.autograd.Function):
    """``all_gather`` along dim 0; backward sums the output gradients over the ranks and returns this
    rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, z):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.world_size = rank, world_size
        z = z.contiguous()
        out = z.new_empty((world_size * z.shape[0],) + tuple(z.shape[1:]))
        _all_gather_single(out, z)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = grad.shape[0] // ctx.world_size
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(out, grad.contiguous())
            return out
        grad = grad.clone(memory_format=torch.contiguous_format)  # Gloo has no reduce-scatter: reduce all,
        dist.all_reduce(grad)  # keep this rank's slice
        return grad[ctx.rank * n : (ctx.rank + 1) * n]


def gather(z: torch.Tensor) -> torch.Tensor:
    """The ranks' ``z`` (shape ``[n, ...]``, the same on every rank) concatenated along dim 0 in rank order,
    differentiable (sum semantics: see the module docstring); ``z`` itself when not distributed."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 1:
        raise ValueError(f"z must have a batch dimension, got shape {tuple(z.shape)}")
    if _world_size() == 1:
        return z
    return _Gather.apply(z)


# ------------------------------------------------------------------------------------ gradients, weights


def _buckets(tensors):
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets.values()


def average_gradients(tensors: list[torch.Tensor | None]) -> None:
    """Replace every tensor by its mean over the ranks, in place; None entries are skipped. One flattened
    ``all_reduce`` per device and dtype. Nothing when not distributed."""
    world_size = _world_size()
    if world_size == 1:
        return
    with torch.no_grad():
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat.div_(world_size)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one broadcast per device and dtype). Nothing when
    not distributed."""
    if _world_size() == 1:
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]
    with torch.no_grad():
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


# ------------------------------------------------------------------------------------------- BatchNorm


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel (dim 1) mean and biased variance of ``x`` over the global batch, and its count per
    channel (a 0-d tensor, so that CUDA is not synchronised): the ranks' counts, means and sums of squared
    deviations, gathered in one collective and combined (Chan et al.)."""
    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // channels if channels else 0
    dtype = _accumulation_dtype(x.dtype)
    if count:
        var, mean = torch.var_mean(x.to(dtype), dim=dims, correction=0)
        m2 = var * count
    else:
        mean = m2 = x.new_zeros(channels, dtype=dtype)
    local = torch.cat([mean.new_full((1,), count), mean, m2])
    world_size = dist.get_world_size()
    everything = local.new_empty(world_size * local.numel())
    _all_gather_single(everything, local)
    everything = everything.view(world_size, -1)
    counts, means, m2s = everything[:, :1], everything[:, 1 : 1 + channels], everything[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) · invstd · weight + bias`` with the global batch statistics; backward through them
    with the global sums of ``dy`` and ``dy · (x - mean)`` (one all_reduce). ``weight``/``bias`` gradients
    are this rank's part, like any other weight's."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dtype = mean.dtype
        scale = invstd if weight is None else invstd * weight.to(dtype)
        y = (x.to(dtype) - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        dtype = mean.dtype
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        dy = dy.to(dtype)
        xmu = x.to(dtype) - mean.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)
            mean_dy, mean_dy_xmu = (sums / count).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(dtype)
            grad_x = (
                (dy - mean_dy.view(shape) - xmu * (invstd**2 * mean_dy_xmu).view(shape)) * scale.view(shape)
            ).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, on the CPU (Gloo) and on CUDA (NCCL).

    The same parameters, buffers and state-dict keys as ``nn.BatchNorm1d/2d/3d`` (any input of 2 or more
    dimensions, channels on dim 1). In training mode with a process group of more than one rank the batch
    statistics are those of the concatenation of the ranks' inputs (backward included), and the running
    statistics move as ``nn.BatchNorm`` would move them on that concatenation (unbiased variance with the
    global count, ``momentum``, ``num_batches_tracked``, ``momentum=None`` cumulative average); otherwise
    (evaluation, no process group, one rank) it is ``F.batch_norm``. Build it with
    :func:`convert_sync_batchnorm`.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # As nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if not (bn_training and self.training and _world_size() > 1):
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps
            )
        with torch.no_grad():
            mean, var, count = _global_moments(input.detach())
            if input.numel() < 2 * input.shape[1] and count < 2:  # (no host sync unless it may be so)
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got {int(count)} over all ranks "
                    f"(local input size {list(input.shape)})"
                )
            if running_mean is not None:
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            if running_var is not None:
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
            invstd = torch.rsqrt(var + self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, invstd, count)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` replaced by a :class:`SyncBatchNorm` that shares its
    parameters and buffers (in place for children; a BatchNorm ``module`` itself is returned converted).
    ``torch.nn.SyncBatchNorm`` layers are converted too (they refuse CPU tensors)."""
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)) and not isinstance(
        module, SyncBatchNorm
    ):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            converted.add_module(name, new)
    return converted
