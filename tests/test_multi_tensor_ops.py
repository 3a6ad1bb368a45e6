"""The compiled meta-step ops (add_scaled_, add_scaled, virtual_sgd_step) against a per-tensor Python loop.

The loop below is the oracle: float64 arithmetic on each tensor, written from SPEC §1 step 2 and the
definition of the scaled add. Every case runs the compiled kernel and the ``torch._foreach`` fallback of
``metamask_fast.ops``, so the two are also equal to each other. Compiled-only cases skip when the extension
is not loaded (``METAMASK_FAST_NO_EXT=1`` in CI's second pass).
"""

import copy
import itertools
import math
import re
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from metamask_fast import ops
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel

needs_extension = pytest.mark.skipif(
    not ops.HAS_EXTENSION, reason=f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in ops._VIRTUAL_SGD_DEVICES else [])

# Odd sizes, an empty and a 0-d tensor, and one that spans two CPU chunks (1 << 16 elements).
SHAPES = [(37,), (5, 7), (), (0,), (3, 1, 9), (70001,), (64, 3, 3, 3)]
TOLERANCE = {torch.float64: 1e-15, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SETTINGS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=nest)
    for m, d, wd, nest in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 5e-4], [False, True])
    if not (nest and (m == 0 or d != 0))
]

_INPUTS = torch.Generator().manual_seed(4)


def fresh(dtype=torch.float64, device="cpu", shapes=SHAPES):
    return [torch.randn(s, generator=_INPUTS, dtype=torch.float64).to(dtype=dtype, device=device) for s in shapes]


def loop_virtual_sgd(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov):
    """SPEC §1 step 2, tensor by tensor, in float64."""
    out = []
    for p, g, b in zip(params, grads, buffers):
        p = p.double()
        if g is None:
            out.append(p)
            continue
        d = g.double() + weight_decay * p
        if momentum != 0:
            b = d if b is None else momentum * b.double() + (1 - dampening) * d
            d = d + momentum * b if nesterov else b
        out.append(p - lr * d)
    return out


def assert_close_to(got, want, dtype):
    """Every element within the dtype's tolerance, relative to the tensor's largest value (at least 1)."""
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        if w.numel():
            error = (g.double().cpu() - w.cpu()).abs().max().item()
            assert error <= TOLERANCE[dtype] * max(w.abs().max().item(), 1.0)


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch):
    """Run a test once through the compiled kernels and once through the torch._foreach fallbacks."""
    if request.param == "compiled":
        if not ops.HAS_EXTENSION:
            pytest.skip(f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})")
        calls = []
        for name in ("add_scaled_", "add_scaled", "add_scaled_out", "virtual_sgd_step"):
            monkeypatch.setattr(ops, f"_{name}_torch", lambda *a, _n=name: calls.append(_n))
        yield request.param
    else:
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        yield request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_virtual_sgd_step_matches_loop(path, device, dtype, settings):
    params = fresh(dtype, device)
    grads = fresh(dtype, device)
    buffers = fresh(dtype, device)
    grads[1] = None  # no gradient: unchanged
    buffers[0] = buffers[4] = None  # no buffer yet: the buffer is d
    saved = [None if b is None else b.clone() for b in buffers]
    got = ops.virtual_sgd_step(params, grads, buffers, lr=0.037, **settings)
    assert_close_to(got, loop_virtual_sgd(params, grads, buffers, 0.037, **settings), dtype)
    assert got[1] is not params[1] and torch.equal(got[1], params[1])
    assert all((b is None and s is None) or torch.equal(b, s) for b, s in zip(buffers, saved))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_add_scaled_matches_loop(path, device, dtype):
    tensors, others = fresh(dtype, device), fresh(dtype, device)
    want = [t.double() - 0.31 * o.double() for t, o in zip(tensors, others)]
    before = [t.clone() for t in tensors]
    out_of_place = ops.add_scaled(tensors, others, -0.31)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert_close_to(out_of_place, want, dtype)
    ops.add_scaled_(tensors, others, -0.31)
    assert_close_to(tensors, want, dtype)
    assert all(torch.equal(a, b) for a, b in zip(tensors, out_of_place))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_add_scaled_into_out_matches_loop(path, device, dtype):
    tensors, others = fresh(dtype, device), fresh(dtype, device)
    want = [t.double() + 0.43 * o.double() for t, o in zip(tensors, others)]
    before = [t.clone() for t in tensors]
    out = [torch.full_like(t, float("nan")) for t in tensors]  # stale contents must not leak into the result
    got = ops.add_scaled(tensors, others, 0.43, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert_close_to(out, want, dtype)
    # Bitwise the same as the allocating form, and as out=tensors (in place).
    assert all(torch.equal(a, b) for a, b in zip(out, ops.add_scaled(tensors, others, 0.43)))
    ops.add_scaled(tensors, others, 0.43, out=tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_add_scaled_of_a_list_with_itself(path, device, dtype):
    tensors = fresh(dtype, device)
    want = [t.double() + 1.5 * t.double() for t in tensors]
    out = [torch.empty_like(t) for t in tensors]
    ops.add_scaled(tensors, tensors, 1.5, out=out)
    assert_close_to(out, want, dtype)
    ops.add_scaled_(tensors, tensors, 1.5)  # x += 1.5 x: the one list read and written
    assert_close_to(tensors, want, dtype)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_large_lists_through_the_streaming_stores(dtype):
    # Outputs of 16 MiB or more are written with non-temporal stores in 16-byte blocks after a head that
    # aligns them: views one element into their storage start misaligned, and odd sizes leave tails.
    def views(shapes, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype)[1:].view(shape)
                for n, shape in ((math.prod(s), s) for s in shapes)]

    values = (20 << 20) // torch.empty((), dtype=dtype).element_size()
    shapes = [(values // 3 + 5,), (3,), (values // 3, 2), (1,)]
    tensors, others, grads, buffers = (views(shapes, seed) for seed in range(4))
    assert tensors[0].data_ptr() % 16 != 0
    out = views(shapes, 9)
    ops.add_scaled(tensors, others, -0.29, out=out)
    assert_close_to(out, [t.double() - 0.29 * o.double() for t, o in zip(tensors, others)], dtype)
    fresh_out = ops.add_scaled(tensors, others, -0.29)
    assert all(torch.equal(a, b) for a, b in zip(out, fresh_out))
    settings = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False)
    got = ops.virtual_sgd_step(tensors, grads, [None, *buffers[1:]], lr=0.05, **settings)
    want = loop_virtual_sgd(tensors, grads, [None, *buffers[1:]], 0.05, **settings)
    assert_close_to(got, want, dtype)


OVERLAPS = [  # (what, op call given one 10-element float64 storage `s`, message)
    ("add_scaled_ partial", lambda s: ops.add_scaled_([s[:6]], [s[4:]], 1.0),
     r"add_scaled_: tensors\[0\] shares memory with others\[0\] without being the same tensor"),
    ("out is others", lambda s: ops.add_scaled([s[:5]], [s[5:]], 1.0, out=[s[5:]]),
     r"add_scaled: out\[0\] shares memory with others\[0\];"),
    ("out partly tensors", lambda s: ops.add_scaled([s[:5]], [torch.ones(5, dtype=s.dtype)], 1.0, out=[s[1:6]]),
     r"add_scaled: out\[0\] shares memory with tensors\[0\] without being the same tensor"),
]


@pytest.mark.parametrize("what,call,message", OVERLAPS, ids=[o[0] for o in OVERLAPS])
def test_overlapping_lists_are_refused(path, what, call, message):
    storage = torch.arange(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        call(storage)
    assert torch.equal(storage, torch.arange(10, dtype=torch.float64))  # refused before anything was written


@needs_extension
@pytest.mark.parametrize("what,call,message", OVERLAPS, ids=[o[0] for o in OVERLAPS])
def test_compiled_ops_refuse_overlapping_lists(what, call, message, monkeypatch):
    # The C++ checks on their own, with the wrapper's Python checks switched off.
    monkeypatch.setattr(ops, "_check_no_overlap", lambda *args, **kwargs: None)
    monkeypatch.setattr(ops, "_add_scaled__torch", lambda *a: pytest.fail("fallback called"))
    monkeypatch.setattr(ops, "_add_scaled_out_torch", lambda *a: pytest.fail("fallback called"))
    storage = torch.arange(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        call(storage)
    assert torch.equal(storage, torch.arange(10, dtype=torch.float64))


def _ones(n=5):
    return torch.ones(n, dtype=torch.float64)


def _same_twice(s):
    t = s[:5]
    ops.add_scaled_([t, t], [_ones(), _ones()], 1.0)


CROSS_OVERLAPS = [  # aliasing across pairs: (what, op call given one 10-element float64 storage `s`, message)
    ("add_scaled_ same tensor twice", _same_twice,
     r"add_scaled_: tensors\[0\] and tensors\[1\] share memory; pass separate tensors"),
    ("add_scaled_ overlapping views", lambda s: ops.add_scaled_([s[:6], s[4:]], [_ones(6), _ones(6)], 1.0),
     r"add_scaled_: tensors\[0\] and tensors\[1\] share memory; pass separate tensors"),
    ("add_scaled_ reads another written", lambda s: ops.add_scaled_([s[:5], s[5:]], [_ones(), s[:5]], 1.0),
     r"add_scaled_: tensors\[0\] shares memory with others\[1\]; pass a separate tensor"),
    ("add_scaled_ reads part of another written", lambda s: ops.add_scaled_([s[5:], _ones()], [_ones(), s[3:8]], 1.0),
     r"add_scaled_: tensors\[0\] shares memory with others\[1\]; pass a separate tensor"),
    ("out twice", lambda s: ops.add_scaled([_ones(), _ones()], [_ones(), _ones()], 1.0, out=[s[:5], s[:5]]),
     r"add_scaled: out\[0\] and out\[1\] share memory; pass separate tensors"),
    ("out overlapping views",
     lambda s: ops.add_scaled([_ones(), _ones()], [_ones(), _ones()], 1.0, out=[s[4:9], s[:5]]),
     r"add_scaled: out\[0\] and out\[1\] share memory; pass separate tensors"),
    ("out is another tensors", lambda s: ops.add_scaled([s[:5], _ones()], [_ones(), _ones()], 1.0, out=[s[5:], s[:5]]),
     r"add_scaled: out\[1\] shares memory with tensors\[0\]; pass a separate tensor"),
    ("out partly another tensors", lambda s: ops.add_scaled([s[:5], _ones()], [_ones(), _ones()], 1.0,
                                                            out=[_ones(), s[2:7]]),
     r"add_scaled: out\[1\] shares memory with tensors\[0\]; pass a separate tensor"),
    ("out is another others", lambda s: ops.add_scaled([_ones(), _ones()], [s[:5], _ones()], 1.0, out=[s[5:], s[:5]]),
     r"add_scaled: out\[1\] shares memory with others\[0\]; pass a separate tensor"),
    ("out in place of another pair", lambda s: ops.add_scaled([s[:5], s[5:]], [_ones(), _ones()], 1.0,
                                                              out=[s[5:], s[:5]]),
     r"add_scaled: out\[1\] shares memory with tensors\[0\]; pass a separate tensor"),
]


def _refusal(call, storage) -> str:
    with pytest.raises(ValueError) as refused:
        call(storage)
    assert torch.equal(storage, torch.arange(10, dtype=torch.float64))  # refused before anything was written
    return str(refused.value)


@pytest.mark.parametrize("what,call,message", CROSS_OVERLAPS, ids=[o[0] for o in CROSS_OVERLAPS])
def test_aliasing_across_pairs_is_refused(path, what, call, message):
    assert re.search(message, _refusal(call, torch.arange(10, dtype=torch.float64)))


@needs_extension
@pytest.mark.parametrize("what,call,message", CROSS_OVERLAPS, ids=[o[0] for o in CROSS_OVERLAPS])
def test_compiled_ops_refuse_aliasing_across_pairs(what, call, message, monkeypatch):
    # The C++ checks on their own, with the wrapper's Python checks switched off; and word for word the
    # message of the Python checks.
    with monkeypatch.context() as m:
        m.setattr(ops, "HAS_EXTENSION", False)
        python_message = _refusal(call, torch.arange(10, dtype=torch.float64))
    monkeypatch.setattr(ops, "_check_no_overlap", lambda *args, **kwargs: None)
    monkeypatch.setattr(ops, "_check_no_cross_overlap", lambda *args, **kwargs: None)
    monkeypatch.setattr(ops, "_add_scaled__torch", lambda *a: pytest.fail("fallback called"))
    monkeypatch.setattr(ops, "_add_scaled_out_torch", lambda *a: pytest.fail("fallback called"))
    compiled_message = _refusal(call, torch.arange(10, dtype=torch.float64))
    assert re.search(message, compiled_message)
    assert compiled_message.splitlines()[0] == python_message


def test_aliasing_that_stays_apart_is_accepted(path):
    s = torch.arange(10, dtype=torch.float64)
    y = torch.linspace(-1, 1, 5, dtype=torch.float64)
    # Adjacent views of one storage (the same memory never written twice), one read tensor in two pairs.
    ops.add_scaled_([s[:5], s[5:]], [y, y], 2.0)
    assert torch.equal(s, torch.arange(10, dtype=torch.float64) + 2 * torch.cat([y, y]))
    # The same: out=tensors exactly, and others[i] = tensors[i] beside a read shared by two pairs.
    s = torch.arange(10, dtype=torch.float64)
    ops.add_scaled([s[:5], s[5:]], [y, y], -1.0, out=[s[:5], s[5:]])
    assert torch.equal(s, torch.arange(10, dtype=torch.float64) - torch.cat([y, y]))
    s = torch.arange(10, dtype=torch.float64)
    ops.add_scaled_([s[:5], s[5:]], [s[:5], y], 0.5)
    want = torch.cat([1.5 * torch.arange(5.0, dtype=torch.float64), torch.arange(5.0, 10.0) + 0.5 * y])
    assert torch.equal(s, want)
    # One tensor read by several pairs (and by both lists) into separate outputs.
    x = torch.arange(5, dtype=torch.float64)
    out = ops.add_scaled([x, x, x], [x, y, y], 3.0, out=[torch.empty(5, dtype=torch.float64) for _ in range(3)])
    assert all(torch.equal(o, w) for o, w in zip(out, [4 * x, x + 3 * y, x + 3 * y]))
    # Empty views at one address touch no memory.
    s = torch.arange(10, dtype=torch.float64)
    ops.add_scaled_([s[3:3], s[3:3], s[:2]], [s[3:3], s[3:3], y[:2]], 1.0)
    assert torch.equal(s[:2], torch.arange(2, dtype=torch.float64) + y[:2])


def _brute_force_refuses(in_place, written, reads):
    """The aliasing rule, pair by pair in O(n²): whether the op must refuse these (1-D) views."""
    def share(a, b):
        if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
        a_begin, b_begin = a.storage_offset(), b.storage_offset()
        return a_begin < b_begin + b.numel() and b_begin < a_begin + a.numel()

    def same(a, b):
        return a.data_ptr() == b.data_ptr()

    n = len(written)
    for i, j in itertools.product(range(n), repeat=2):
        if i != j and share(written[i], written[j]):
            return True
        for k, read in enumerate(reads):
            if not share(written[i], read[j]):
                continue
            if i != j:
                return True
            same_allowed = k == 0  # others[i] in place, tensors[i] for out; never others[i] for out
            if not (same_allowed and same(written[i], read[j])):
                return True
    return False


@needs_extension
@pytest.mark.parametrize("in_place", [True, False], ids=["add_scaled_", "add_scaled.out"])
def test_random_aliasing_against_the_pairwise_rule(in_place, monkeypatch):
    # Lists of random views into a few shared storages: C++ and Python refuse exactly what the pairwise
    # rule refuses, with the same message, and what they accept gives the per-tensor result.
    g = torch.Generator().manual_seed(21)
    refused = accepted = 0
    for trial in range(300):
        storages = [torch.randn(12, generator=g, dtype=torch.float64) for _ in range(2)]
        n = int(torch.randint(1, 5, (), generator=g))
        lengths = [int(torch.randint(0, 4, (), generator=g)) for _ in range(n)]

        def view(length):
            if torch.rand((), generator=g) < 0.25:
                return torch.randn(length, generator=g, dtype=torch.float64)
            s = storages[int(torch.randint(0, 2, (), generator=g))]
            start = int(torch.randint(0, 12 - length + 1, (), generator=g))
            return s[start:start + length]

        lists = [[view(length) for length in lengths] for _ in range(3 if not in_place else 2)]
        if in_place:
            tensors, others = lists
            written, reads = tensors, [others]
            call = lambda: ops.add_scaled_(tensors, others, 0.5)  # noqa: E731
        else:
            tensors, others, out = lists
            written, reads = out, [tensors, others]
            call = lambda: ops.add_scaled(tensors, others, 0.5, out=out)  # noqa: E731
        want = [t + 0.5 * o for t, o in zip(tensors, others)]
        before = [s.clone() for s in storages]
        snapshot = [[t.clone() for t in listed] for listed in lists]
        messages = []
        for compiled in (False, True):
            with monkeypatch.context() as m:
                if compiled:
                    m.setattr(ops, "_check_no_overlap", lambda *args, **kwargs: None)
                    m.setattr(ops, "_check_no_cross_overlap", lambda *args, **kwargs: None)
                    m.setattr(ops, "_add_scaled__torch", lambda *a: pytest.fail("fallback called"))
                    m.setattr(ops, "_add_scaled_out_torch", lambda *a: pytest.fail("fallback called"))
                else:
                    m.setattr(ops, "HAS_EXTENSION", False)
                try:
                    call()
                except ValueError as exc:
                    messages.append(str(exc).splitlines()[0])
                    assert all(torch.equal(s, b) for s, b in zip(storages, before))
                    continue
                messages.append(None)
                torch.testing.assert_close(written, want, rtol=1e-15, atol=1e-15, msg=lambda m: f"{trial}: {m}")
                for listed, saved in zip(lists, snapshot):  # back to the inputs for the other path
                    for t, b in zip(listed, saved):
                        t.copy_(b)
        assert messages[0] == messages[1], trial
        assert (messages[0] is not None) == _brute_force_refuses(in_place, written, reads), (trial, messages[0])
        refused += messages[0] is not None
        accepted += messages[0] is None
    assert refused > 50 and accepted > 50  # both outcomes well covered


@pytest.mark.parametrize("form", ["add_scaled_", "add_scaled.out"])
def test_writes_bump_autograd_version_counters(path, form):
    # A tensor that autograd saved for backward, then written by the op: backward must refuse, as after
    # torch's own in-place ops, rather than use the new values. The saved tensor is not the list's first.
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    tensors = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    others = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    written = tensors if form == "add_scaled_" else [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    loss = (w * written[1]).sum()  # saves written[1] for the gradient of w
    version = written[1]._version
    if form == "add_scaled_":
        ops.add_scaled_(tensors, others, 0.5)
    else:
        ops.add_scaled(tensors, others, 0.5, out=written)
    assert written[1]._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    (w * written[1]).sum().backward()  # a graph built after the write is fine
    assert torch.equal(w.grad, written[1])


def test_inference_tensors_are_written_in_place(path):
    # Inference tensors have no version counter to bump.
    with torch.inference_mode():
        tensors, others = fresh(), fresh()
        want = [t + 2.0 * o for t, o in zip(tensors, others)]
        ops.add_scaled_(tensors, others, 2.0)
        out = ops.add_scaled(tensors, others, 1.0, out=[torch.empty_like(t) for t in tensors])
    assert_close_to(tensors, want, torch.float64)
    assert_close_to(out, [t.double() + o.double() for t, o in zip(tensors, others)], torch.float64)


@needs_extension
def test_compiled_ops_are_called():
    tensors, others = fresh(), fresh()
    with torch.autograd.profiler.profile() as prof:
        ops.add_scaled_(tensors, others, 0.5)
        ops.add_scaled(tensors, others, 0.5)
        ops.add_scaled(tensors, others, 0.5, out=[torch.empty_like(t) for t in tensors])
        ops.virtual_sgd_step(tensors, others, [None] * len(tensors), lr=0.1, momentum=0.9)
    names = [e.name for e in prof.function_events]
    # (The profiler names an op without its overload: add_scaled.out shows as a second add_scaled.)
    assert [n for n in names if n.startswith("metamask_fast::")] == [
        "metamask_fast::add_scaled_", "metamask_fast::add_scaled", "metamask_fast::add_scaled",
        "metamask_fast::virtual_sgd_step",
    ]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_channels_last_lists_run_compiled_and_keep_their_layout(dtype):
    # Weights of a channels_last model: dense, but not contiguous. The kernels take them as flat arrays
    # when every list has the same strides, and the results keep the layout.
    g = torch.Generator().manual_seed(12)

    def lists():
        return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
                for s in ((5, 3, 3, 3), (7, 5, 1, 1))] + [torch.randn(9, generator=g, dtype=torch.float64).to(dtype)]

    tensors, others, buffers = lists(), lists(), lists()
    assert not tensors[0].is_contiguous()
    with torch.autograd.profiler.profile() as prof:
        got = ops.add_scaled(tensors, others, 0.7)
        stepped = ops.virtual_sgd_step(tensors, others, buffers, lr=0.1, momentum=0.9, weight_decay=1e-2)
        norm = ops.global_norm(tensors)
    names = [e.name for e in prof.function_events if e.name.startswith("metamask_fast::")]
    assert names == ["metamask_fast::add_scaled", "metamask_fast::virtual_sgd_step", "metamask_fast::global_norm"]
    assert [r.stride() for r in got] == [t.stride() for t in tensors]
    assert [r.stride() for r in stepped] == [t.stride() for t in tensors]
    assert_close_to(got, [t.double() + 0.7 * o.double() for t, o in zip(tensors, others)], dtype)
    assert_close_to(stepped, loop_virtual_sgd(tensors, others, buffers, 0.1, 0.9, 0.0, 1e-2, False), dtype)
    want_norm = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert abs(norm.double() - want_norm) <= TOLERANCE[dtype] * want_norm
    out = [torch.empty_like(t) for t in tensors]
    ops.add_scaled(tensors, others, 0.7, out=out)
    assert all(torch.equal(a, b) for a, b in zip(out, got))
    # Mixed layouts in one pair: the fallback, with the same numbers.
    mixed = [o.contiguous() for o in others]
    assert_close_to(ops.add_scaled(tensors, mixed, 0.7), [t.double() + 0.7 * o.double() for t, o in zip(tensors, others)],
                    dtype)


@needs_extension
def test_layouts_that_differ_only_in_size_one_dimensions_run_compiled():
    # A (5, 1, 3, 3) weight: contiguous and channels_last order its elements the same way with different
    # strides (the stride of the size-1 dimension is arbitrary), so the kernels take the pair.
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    channels_last = weight.to(memory_format=torch.channels_last)
    assert weight.stride() != channels_last.stride()
    other = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    with torch.autograd.profiler.profile() as prof:
        got = ops.add_scaled([channels_last], [other], 0.5)
    assert "metamask_fast::add_scaled" in {e.name for e in prof.function_events}
    torch.testing.assert_close(got[0], weight + 0.5 * other, rtol=0, atol=0)


def test_non_contiguous_inputs_take_the_fallback_and_are_right():
    base = fresh(shapes=[(6, 8), (4, 10)])
    tensors = [base[0].T, base[1][:, ::2]]
    others = [torch.randn_like(t) for t in tensors]
    want = [t + 2.0 * o for t, o in zip(tensors, others)]
    torch.testing.assert_close(ops.add_scaled(tensors, others, 2.0), want, rtol=1e-15, atol=1e-15)
    got = ops.virtual_sgd_step(tensors, others, [None, None], lr=0.1, momentum=0.9)
    torch.testing.assert_close(got, loop_virtual_sgd(tensors, others, [None, None], 0.1, 0.9, 0.0, 0.0, False))


OPCHECK_CASES = {  # overload: (args, kwargs)
    "add_scaled_.default": lambda: ((fresh(), fresh(), 0.7), {}),
    "add_scaled.default": lambda: ((fresh(), fresh(), -1.3), {}),
    "add_scaled.out": lambda: ((fresh(), fresh(), -1.3), {"out": fresh()}),
    "virtual_sgd_step.default": lambda: ((fresh(), fresh(), [None, *fresh()[1:]], 0.1, 0.9, 0.1, 5e-4, False), {}),
}


@needs_extension
@pytest.mark.parametrize("op", list(OPCHECK_CASES))
def test_opcheck(op):
    packet, overload = op.split(".")
    args, kwargs = OPCHECK_CASES[op]()
    torch.library.opcheck(getattr(getattr(torch.ops.metamask_fast, packet), overload), args, kwargs)


BAD_COMPILED = [
    ("add_scaled_", lambda: (fresh()[:2], fresh()[:3], 1.0), "equally long"),
    ("add_scaled", lambda: (fresh(shapes=[(3,)]), fresh(shapes=[(4,)]), 1.0), r"others\[0\] must have the shape"),
    ("add_scaled", lambda: (fresh(shapes=[(3,)]), fresh(torch.float32, shapes=[(3,)]), 1.0), "dtype and device"),
    ("add_scaled.out", lambda: (fresh(shapes=[(3,)]), fresh(shapes=[(3,)]), 1.0, fresh(torch.float32, shapes=[(3,)])),
     r"out\[0\] must have the dtype and device"),
    ("add_scaled.out", lambda: (fresh(shapes=[(2, 3)]), fresh(shapes=[(2, 3)]), 1.0, [fresh(shapes=[(3, 2)])[0].T]),
     r"out\[0\] must have the memory layout \(strides\) of tensors\[0\], \[3, 1\], got \[1, 2\]"),
    ("add_scaled_", lambda: ([torch.randn(6, 8, dtype=torch.float64)[:, ::2]], fresh(shapes=[(6, 4)]), 1.0),
     r"tensors\[0\] must be contiguous \(or dense in another memory format"),
    ("add_scaled_", lambda: ([torch.randn(4, 6, dtype=torch.float64).T], fresh(shapes=[(6, 4)]), 1.0),
     r"others\[0\] must have the memory layout \(strides\) of tensors\[0\]"),
    ("virtual_sgd_step", lambda: (fresh(shapes=[(3,)]), fresh(shapes=[(3,)]), [None, None], 0.1, 0.9, 0.0, 0.0, False),
     "as long as `params`"),
    ("virtual_sgd_step", lambda: (fresh(shapes=[(3,)]), fresh(shapes=[(3,)]), fresh(shapes=[(2,)]), 0.1, 0.9, 0.0, 0.0,
                                  False), r"buffers\[0\] must have the shape"),
    ("virtual_sgd_step", lambda: (fresh(shapes=[(3,), (4,)]), fresh(shapes=[(3,), (4,)]), [None, *fresh(shapes=[(5,)])],
                                  0.1, 0.9, 0.0, 0.0, False), r"buffers\[1\] must have the shape of params\[1\]"),
    ("virtual_sgd_step", lambda: (fresh(shapes=[(3,)]), [torch.randn(6, dtype=torch.float64)[::2]], [None], 0.1, 0.9,
                                  0.0, 0.0, False), r"grads\[0\] must have the memory layout"),
    ("virtual_sgd_step", lambda: ([torch.randn(6, dtype=torch.float64)[::2]], fresh(shapes=[(3,)]), [None], 0.1, 0.9,
                                  0.0, 0.0, False), r"params\[0\] must be contiguous"),
]


@needs_extension
@pytest.mark.parametrize("op,make,message", BAD_COMPILED, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_COMPILED)])
def test_compiled_ops_reject_bad_input(op, make, message):
    packet, _, overload = op.partition(".")
    with pytest.raises(ValueError, match=message):
        if overload == "out":
            *args, out = make()
            torch.ops.metamask_fast.add_scaled.out(*args, out=out)
        else:
            getattr(torch.ops.metamask_fast, packet).default(*make())


def test_wrappers_reject_bad_input():
    # (An empty list never reaches a kernel: the dispatcher needs a tensor to pick one.)
    with pytest.raises(ValueError, match="non-empty"):
        ops.add_scaled([], [], 1.0)
    with pytest.raises(ValueError, match="equally long"):
        ops.add_scaled(fresh()[:2], fresh()[:3], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        ops.add_scaled(fresh(), fresh(), float("inf"))
    with pytest.raises(ValueError, match=r"others\[1\]"):
        ops.add_scaled_(fresh(shapes=[(2,), (3,)]), fresh(shapes=[(2,), (4,)]), 1.0)
    with pytest.raises(ValueError, match=r"out\[1\] must have the shape of tensors\[1\]"):
        ops.add_scaled(fresh(shapes=[(2,), (3,)]), fresh(shapes=[(2,), (3,)]), 1.0, out=fresh(shapes=[(2,), (4,)]))
    with pytest.raises(ValueError, match="equally long"):
        ops.add_scaled(fresh(), fresh(), 1.0, out=fresh()[:2])
    with pytest.raises(TypeError, match="`out` must be a list"):
        ops.add_scaled(fresh(), fresh(), 1.0, out=fresh()[0])


def test_metamask_step_same_with_compiled_ops_and_fallbacks(monkeypatch):
    # The ops are the step's only elementwise sweeps over the weights: switching them changes nothing.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model = MetaMaskModel(backbone, 4, bt_dims=(9, 9, 11), cl_dims=(8, 5)).double()
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randn(7, 1, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)) for _ in range(3)]

    def train(m):
        network = [p for name, p in m.named_parameters() if not name.startswith("mask.")]
        step = MetaMaskStep(m, torch.optim.SGD(network, lr=0.05, momentum=0.9, weight_decay=5e-4),
                            torch.optim.SGD([m.mask.logits], lr=0.05, momentum=0.9))
        for x0, x1 in batches:
            step.step(x0, x1)
        return m

    compiled = train(copy.deepcopy(model))
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    fallback = train(copy.deepcopy(model))
    for (name, a), b in zip(compiled.named_parameters(), fallback.parameters()):
        assert (a - b).abs().max() <= 1e-12 * max(b.abs().max().item(), 1.0), name
    assert not torch.equal(compiled.mask.logits, model.mask.logits)


def offset_view(n: int, device: str, generator: torch.Generator, offset: int = 1) -> torch.Tensor:
    """``n`` float64 values starting ``offset`` elements into an allocation made on ``device``: 8 bytes in,
    no vector path can take the view; 16 bytes in, the float64 vector path can. (Sliced on the device: moving
    a view copies it to a fresh, aligned tensor.)"""
    return torch.randn(n + offset, generator=generator, dtype=torch.float64).to(device)[offset:]


def test_offset_views_stay_offset_on_their_device():
    for offset in (1, 2):
        view = offset_view(10, "cpu", torch.Generator().manual_seed(0), offset)
        assert view.data_ptr() % 32 == 8 * offset and view.storage_offset() == offset


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and the extension's CUDA kernels")
def test_cuda_launch_splitting_and_misaligned_views():
    # More tensors than one launch holds, a tensor of more chunks than one launch holds, and views that
    # start one element into their storage (no aligned vector path): the CUDA kernels against the loop.
    g = torch.Generator().manual_seed(5)
    sizes = [int(s) for s in torch.randint(1, 5000, (120,), generator=g)] + [13_000_001]

    def make():
        return [offset_view(n, "cuda", g, 1 + i % 2) if i % 7 == 3
                else torch.randn(n, generator=g, dtype=torch.float64).to("cuda") for i, n in enumerate(sizes)]
    params, grads, buffers = make(), make(), make()
    assert {t.data_ptr() % 32 for t in params} == {0, 8, 16}
    settings = dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, nesterov=False)
    got = ops.virtual_sgd_step(params, grads, buffers, lr=0.01, **settings)
    assert_close_to(got, loop_virtual_sgd(params, grads, buffers, 0.01, **settings), torch.float64)
    want = [t.double() + 0.5 * o.double() for t, o in zip(params, grads)]
    assert_close_to(ops.add_scaled(params, grads, 0.5), want, torch.float64)
    ops.add_scaled_(params, grads, 0.5)
    assert_close_to(params, want, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# No fused multiply-add: every product and sum rounded on its own, on every device


def numpy_virtual_sgd(p, g, b, lr, momentum, dampening, weight_decay, nesterov):
    """SPEC §1 step 2 in numpy at the arrays' own precision: numpy rounds each product and each sum."""
    f = p.dtype.type
    d = g + f(weight_decay) * p if weight_decay else g
    if momentum:
        b = d if b is None else f(momentum) * b + f(1 - dampening) * d
        d = d + f(momentum) * b if nesterov else b
    return p - f(lr) * d


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compiled_kernels_round_every_operation(device, dtype):
    # -1 + 3 * fl(1/3): 0 with a rounded product, 2.98e-8 in float32 with a fused multiply-add.
    x, y = torch.tensor([-1.0], dtype=dtype, device=device), torch.tensor([1 / 3], dtype=dtype, device=device)
    assert ops.add_scaled([x], [y], 3.0)[0].item() == 0.0
    params, grads = fresh(dtype, device), fresh(dtype, device)
    buffers = [None, *fresh(dtype, device)[1:]]
    numpy = lambda tensors: [None if t is None else t.cpu().numpy() for t in tensors]  # noqa: E731
    for got, p, o in zip(ops.add_scaled(params, grads, 0.37), numpy(params), numpy(grads)):
        assert np.array_equal(got.cpu().numpy(), p + p.dtype.type(0.37) * o)
    for settings in SETTINGS:
        got = ops.virtual_sgd_step(params, grads, buffers, lr=0.013, **settings)
        for out, p, g, b in zip(got, numpy(params), numpy(grads), numpy(buffers)):
            assert np.array_equal(out.cpu().numpy(), numpy_virtual_sgd(p, g, b, 0.013, **settings)), settings


def test_cuda_kernels_compile_without_fused_multiply_add(tmp_path):
    # nvcc contracts a + b*c into fma unless told not to; the PTX of the CUDA sources, compiled with the
    # installed build's own nvcc flags, must hold no fma (so that the GPU test above can hold).
    import sysconfig
    from pathlib import Path

    from metamask_fast import _build

    record = _build.STATUS.record or {}
    if not record.get("nvcc_flags"):
        pytest.skip("this build has no CUDA kernels (no CUDA toolkit at install time, or METAMASK_FAST_CUDA=0)")
    from torch.utils.cpp_extension import include_paths

    nvcc = Path(record["cuda_toolkit"]) / "bin" / "nvcc"
    flags = [flag for flag in record["nvcc_flags"] if not flag.startswith("-gencode")]
    includes = [f"-I{path}" for path in (*include_paths(), sysconfig.get_paths()["include"])]
    defines = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    sources = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
    assert sources
    for source in sources:
        ptx = tmp_path / f"{source.stem}.ptx"
        out = subprocess.run([str(nvcc), "-ptx", "-arch=compute_90", "-std=c++20", "--expt-relaxed-constexpr",
                              *flags, *defines, *includes, str(source), "-o", str(ptx)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        text = ptx.read_text()
        assert ".entry" in text and "fma.rn" not in text, source.name
