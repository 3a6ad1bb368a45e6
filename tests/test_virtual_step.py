"""ops.virtual_sgd_step against torch.optim.SGD itself, and ops.add_scaled_ against its formula."""

import itertools

import pytest
import torch

from metamask_fast import ops

SHAPES = [(37,), (5, 7), (3, 1, 9), (0,)]
SETTINGS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=nest)
    for m, d, wd, nest in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 5e-4], [False, True])
    if not (nest and (m == 0 or d != 0))
]


def random_tensors(dtype=torch.float64):
    return [torch.randn(s, dtype=dtype) for s in SHAPES]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("warm", [False, True])
def test_virtual_sgd_step_is_the_update_sgd_makes(settings, warm):
    lr = 0.037
    params = [torch.nn.Parameter(t) for t in random_tensors()]
    optimizer = torch.optim.SGD(params, lr=lr, **settings)
    if warm:  # a first real step creates the momentum buffers
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    grads = [torch.randn_like(p) for p in params]
    grads[1] = None  # a weight without gradient keeps its value
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
    saved_buffers = [None if b is None else b.clone() for b in buffers]
    saved_params = [p.detach().clone() for p in params]

    virtual = ops.virtual_sgd_step(params, grads, buffers, lr=lr, **settings)

    for p, saved in zip(params, saved_params):
        assert torch.equal(p.detach(), saved)
    for b, saved in zip(buffers, saved_buffers):
        assert (b is None and saved is None) or torch.equal(b, saved)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for v, p in zip(virtual, params):
        assert not v.requires_grad
        torch.testing.assert_close(v, p.detach(), rtol=1e-14, atol=1e-15)


def test_virtual_sgd_step_bad_input():
    params = random_tensors()
    with pytest.raises(ValueError, match="grads"):
        ops.virtual_sgd_step(params, [None], [None] * 4, lr=0.1)
    with pytest.raises(ValueError, match="buffers"):
        ops.virtual_sgd_step(params, [None] * 4, [], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ops.virtual_sgd_step(params, [None] * 4, [None] * 4, lr=float("nan"))
    with pytest.raises(ValueError, match="nesterov"):
        ops.virtual_sgd_step(params, [None] * 4, [None] * 4, lr=0.1, nesterov=True)
    wrong = [torch.randn(2, dtype=torch.float64)] + [None] * 3
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        ops.virtual_sgd_step(params, wrong, [None] * 4, lr=0.1)
    grads = [torch.randn_like(p) for p in params]
    with pytest.raises(ValueError, match=r"buffers\[2\]"):
        ops.virtual_sgd_step(params, grads, [None, None, torch.randn(99, dtype=torch.float64), None], lr=0.1,
                             momentum=0.9)
    with pytest.raises(TypeError, match=r"buffers\[1\]"):
        ops.virtual_sgd_step(params, grads, [None, "buffer", None, None], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"buffers\[0\]"):
        ops.virtual_sgd_step(params, grads, [params[0].float(), None, None, None], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        ops.virtual_sgd_step(params, grads, [None] * 4, lr=-0.1)
    with pytest.raises(TypeError, match="nesterov"):
        ops.virtual_sgd_step(params, grads, [None] * 4, lr=0.1, momentum=0.9, nesterov=1)


def test_virtual_sgd_step_accepts_a_tensor_lr_like_sgd():
    params = random_tensors()
    grads = [torch.randn_like(p) for p in params]
    got = ops.virtual_sgd_step(params, grads, [None] * 4, lr=torch.tensor(0.25))
    want = ops.virtual_sgd_step(params, grads, [None] * 4, lr=0.25)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_scaled_in_place(dtype):
    xs, ys = random_tensors(dtype), random_tensors(dtype)
    xs.append(torch.randn(6, 4, dtype=dtype).T)  # non-contiguous
    ys.append(torch.randn(4, 6, dtype=dtype))
    want = [x.double() + 0.31 * y.double() for x, y in zip(xs, ys)]
    ops.add_scaled_(xs, ys, 0.31)
    for x, w in zip(xs, want):
        torch.testing.assert_close(x.double(), w, rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=1e-6)


def test_add_scaled_bad_input():
    xs = random_tensors()
    with pytest.raises(ValueError, match="others"):
        ops.add_scaled_(xs, xs[:2], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        ops.add_scaled_(xs, random_tensors(), float("inf"))
    with pytest.raises(TypeError, match="others"):
        ops.add_scaled_(xs, [1.0] * 4, 1.0)
