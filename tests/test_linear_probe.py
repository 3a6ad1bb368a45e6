"""topk_accuracy and linear_probe: against plain references, on separable data, determinism, argument checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metamask_fast.evaluate import LINEAR_PROBE_LR, linear_probe, topk_accuracy


def reference_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Row by row in plain Python: classes sorted by logit, descending, ties to the smaller index."""
    hits = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits += label in order[:k]
    return hits / len(labels)


def gaussian_blobs(num_classes: int, dim: int, per_class: int, *, spread: float, seed: int, sample_seed: int):
    """Features ``[num_classes * per_class, dim]``: unit Gaussians around class centres ``spread · N(0, I)``
    (drawn from ``seed``; the samples from ``sample_seed``), shuffled; labels int64."""
    centres = spread * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(sample_seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    permutation = torch.randperm(len(labels), generator=generator)
    return features[permutation], labels[permutation]


@pytest.fixture(scope="module")
def blobs():
    """7 well separated classes in 13 dimensions: 40 training and 20 test samples per class."""
    train_x, train_y = gaussian_blobs(7, 13, 40, spread=4.0, seed=11, sample_seed=1)
    test_x, test_y = gaussian_blobs(7, 13, 20, spread=4.0, seed=11, sample_seed=2)
    return train_x, train_y, test_x, test_y


# -------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("num_rows, num_classes", [(1, 1), (37, 9), (64, 3)])
def test_topk_accuracy_matches_a_python_loop(num_rows, num_classes):
    generator = torch.Generator().manual_seed(num_rows * num_classes)
    logits = torch.randn(num_rows, num_classes, generator=generator)
    labels = torch.randint(num_classes, (num_rows,), generator=generator)
    ks = tuple(dict.fromkeys((1, 2, 5, num_classes)))  # distinct k, in order
    result = topk_accuracy(logits, labels, ks=ks)
    assert list(result) == list(ks)
    for k in ks:
        assert result[k] == pytest.approx(reference_topk(logits, labels, k), abs=1e-12), k


def test_topk_accuracy_breaks_ties_towards_the_smaller_index():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (200, 6), generator=generator).float()  # many ties
    labels = torch.randint(6, (200,), generator=generator)
    result = topk_accuracy(logits, labels, ks=(1, 2, 3, 4))
    for k in (1, 2, 3, 4):
        assert result[k] == pytest.approx(reference_topk(logits, labels, k), abs=1e-12), k
    # Top-1 is argmax's choice (argmax returns the first maximal index).
    assert result[1] == pytest.approx((logits.argmax(dim=1) == labels).double().mean().item(), abs=1e-12)
    # Constant logits: only class 0 is the top-1 prediction, and a label c is in the top k when c < k.
    constant = topk_accuracy(torch.zeros(6, 6), torch.arange(6), ks=(1, 4))
    assert constant == {1: pytest.approx(1 / 6), 4: pytest.approx(4 / 6)}


def test_topk_accuracy_clamps_k_to_the_number_of_classes():
    logits = torch.randn(10, 3)
    labels = torch.randint(3, (10,))
    assert topk_accuracy(logits, labels, ks=(3, 5, 100)) == {3: 1.0, 5: 1.0, 100: 1.0}


@pytest.mark.parametrize(
    "logits, labels, ks, error, name",
    [
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), (1,), TypeError, "logits"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), (1,), ValueError, "logits"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), (1,), ValueError, "logits"),
        (torch.tensor([[0.0, math.nan]]), torch.zeros(1, dtype=torch.int64), (1,), ValueError, "logits"),
        ([[0.0, 1.0]], torch.zeros(1, dtype=torch.int64), (1,), TypeError, "logits"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32), (1,), TypeError, "labels"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), (1,), ValueError, "labels"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), (1,), ValueError, "labels"),
        (torch.zeros(4, 3), torch.tensor([0, 1, -1, 2]), (1,), ValueError, "labels"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), (), ValueError, "ks"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), (0, 1), ValueError, "ks"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), (True,), ValueError, "ks"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), (1.0,), ValueError, "ks"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), 5, TypeError, "ks"),
    ],
)
def test_topk_accuracy_rejects_bad_input(logits, labels, ks, error, name):
    with pytest.raises(error, match=name):
        topk_accuracy(logits, labels, ks=ks)


# ------------------------------------------------------------------------------------------ the probe


def test_probe_separates_gaussian_blobs(blobs):
    train_x, train_y, test_x, test_y = blobs
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=30, batch_size=32)
    assert result["top1"] >= 0.99
    assert result["train_top1"] >= 0.99
    assert result["top5"] == 1.0
    assert result["num_classes"] == 7 and result["num_train"] == 280 and result["num_test"] == 140
    assert result["epochs"] == 30 and result["batch_size"] == 32 and result["lr"] == LINEAR_PROBE_LR
    assert result["state"]["weight"].shape == (7, 13) and result["state"]["bias"].shape == (7,)
    # Everything but the state is a plain number, ready for metrics.jsonl.
    json.dumps({key: value for key, value in result.items() if key != "state"})


def reference_probe(train_x, train_y, test_x, *, num_classes, epochs, batch_size, lr, weight_decay, seed):
    """The documented protocol written out: standardise, zero-initialised nn.Linear, AdamW with the decay on
    the weight only, the closed-form cosine learning rate per step, seeded permutations every epoch."""
    mean = train_x.double().mean(dim=0)
    std = ((train_x.double() - mean) ** 2).mean(dim=0).sqrt()
    train_s = (train_x - mean.float()) / std.float()
    test_s = (test_x - mean.float()) / std.float()
    model = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    optimizer = torch.optim.AdamW([{"params": [model.weight], "weight_decay": weight_decay},
                                   {"params": [model.bias], "weight_decay": 0.0}], lr=lr)
    total = epochs * math.ceil(len(train_x) / batch_size)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(train_x), batch_size):
            batch = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(train_s[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        return model, model(train_s), model(test_s)


def test_probe_equals_the_protocol_written_out():
    # Overlapping classes (not separable), a partial last batch, weight decay: a real fit to compare.
    train_x, train_y = gaussian_blobs(5, 9, 21, spread=1.0, seed=5, sample_seed=1)
    test_x, test_y = gaussian_blobs(5, 9, 12, spread=1.0, seed=5, sample_seed=2)
    train_x = 3.0 * train_x + 2.0
    test_x = 3.0 * test_x + 2.0
    settings = dict(epochs=7, batch_size=16, lr=0.02, weight_decay=0.05, seed=4)
    result = linear_probe(train_x, train_y, test_x, test_y, **settings)
    model, train_logits, test_logits = reference_probe(train_x, train_y, test_x, num_classes=5, **settings)
    torch.testing.assert_close(result["state"]["weight"], model.weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(result["state"]["bias"], model.bias.detach(), rtol=0, atol=1e-5)
    assert result["top1"] == topk_accuracy(test_logits, test_y, ks=(1,))[1]
    assert result["top5"] == topk_accuracy(test_logits, test_y, ks=(5,))[5]
    assert result["train_top1"] == topk_accuracy(train_logits, train_y, ks=(1,))[1]
    assert result["train_loss"] == pytest.approx(F.cross_entropy(train_logits, train_y).item(), rel=1e-5)
    assert 0.3 < result["top1"] < 1.0  # the classes overlap: a fit, neither chance nor perfect


def test_probe_state_reproduces_its_logits(blobs):
    train_x, train_y, test_x, test_y = blobs
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=64)
    state = result["state"]
    torch.testing.assert_close(state["mean"], train_x.mean(dim=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(state["std"], train_x.std(dim=0, unbiased=False), rtol=1e-5, atol=0)
    logits = ((test_x - state["mean"]) / state["std"]) @ state["weight"].T + state["bias"]
    assert topk_accuracy(logits, test_y, ks=(1, 5)) == {1: result["top1"], 5: result["top5"]}


def test_probe_is_invariant_to_rescaling_and_shifting_dimensions(blobs):
    train_x, train_y, test_x, test_y = blobs
    scale = torch.linspace(0.01, 100.0, train_x.shape[1])
    shift = torch.linspace(-50.0, 50.0, train_x.shape[1])
    plain = linear_probe(train_x, train_y, test_x, test_y, epochs=4, batch_size=64)
    moved = linear_probe(train_x * scale + shift, train_y, test_x * scale + shift, test_y, epochs=4, batch_size=64)
    torch.testing.assert_close(moved["state"]["weight"], plain["state"]["weight"], rtol=0, atol=1e-4)
    assert moved["top1"] == plain["top1"]


def test_probe_is_deterministic_and_seeded(blobs):
    train_x, train_y, test_x, test_y = blobs
    torch.manual_seed(0)
    first = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=50, seed=7)
    torch.manual_seed(1)  # the global generator plays no part
    again = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=50, seed=7)
    other = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=50, seed=8)
    for key in first:
        if key != "state":
            assert first[key] == again[key], key
    for name in first["state"]:
        assert torch.equal(first["state"][name], again["state"][name]), name
    assert not torch.equal(first["state"]["weight"], other["state"]["weight"])


def test_probe_handles_constant_dimensions_and_classes_missing_from_training():
    train_x, train_y = gaussian_blobs(3, 4, 10, spread=5.0, seed=1, sample_seed=1)
    train_x[:, 2] = 0.1  # constant over the training set
    test_x = torch.randn(6, 4)
    test_y = torch.tensor([0, 1, 2, 3, 4, 0])  # classes 3 and 4 never seen in training
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=2, batch_size=8)
    state = result["state"]
    assert result["num_classes"] == 5 and state["weight"].shape == (5, 4)
    assert state["std"][2] == 1.0 and state["mean"][2] == torch.tensor(0.1)
    assert torch.equal(state["weight"][:, 2], torch.zeros(5))  # its standardised value is always 0
    assert all(math.isfinite(result[key]) for key in ("top1", "top5", "train_top1", "train_loss"))
    # Classes never seen in training are only pushed down: their bias ends below every seen class's.
    assert state["bias"][3:].max() < state["bias"][:3].min()


def test_probe_runs_inside_no_grad_and_inference_mode(blobs):
    train_x, train_y, test_x, test_y = blobs
    expected = linear_probe(train_x, train_y, test_x, test_y, epochs=1)
    with torch.no_grad():
        assert linear_probe(train_x, train_y, test_x, test_y, epochs=1)["top1"] == expected["top1"]
    with torch.inference_mode():
        features = train_x.clone()  # an inference tensor
        assert linear_probe(features, train_y, test_x, test_y, epochs=1)["top1"] == expected["top1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_on_cuda_matches_cpu(blobs):
    train_x, train_y, test_x, test_y = blobs
    cpu = linear_probe(train_x, train_y, test_x, test_y, epochs=10, batch_size=32)
    cuda = linear_probe(train_x, train_y, test_x, test_y, epochs=10, batch_size=32, device="cuda")
    assert cuda["state"]["weight"].device.type == "cpu"
    torch.testing.assert_close(cuda["state"]["weight"], cpu["state"]["weight"], rtol=1e-3, atol=1e-3)
    assert cuda["top1"] == pytest.approx(cpu["top1"], abs=1 / len(test_y))


def test_probe_rejects_unlabeled_samples():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 1, -1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"train_labels contains -1"):
        linear_probe(x, labels, x, labels.clamp(min=0))
    with pytest.raises(ValueError, match=r"test_labels contains -1"):
        linear_probe(x, labels.clamp(min=0), x, labels)


def _arguments(**changes):
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    arguments = dict(train_features=x, train_labels=y, test_features=x[:4], test_labels=y[:4], epochs=1)
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize(
    "changes, error, name",
    [
        (dict(train_features=torch.randn(6)), ValueError, "train_features"),
        (dict(train_features=torch.zeros(6, 3, dtype=torch.int64)), TypeError, "train_features"),
        (dict(train_features=torch.full((6, 3), math.nan)), ValueError, "train_features"),
        (dict(test_features=torch.full((4, 3), math.inf)), ValueError, "test_features"),
        (dict(test_features=torch.randn(4, 5)), ValueError, "test_features"),
        (dict(train_features=[[0.0] * 3] * 6), TypeError, "train_features"),
        (dict(train_labels=torch.zeros(6, dtype=torch.int32)), TypeError, "train_labels"),
        (dict(train_labels=torch.zeros(5, dtype=torch.int64)), ValueError, "train_labels"),
        (dict(test_labels=torch.tensor([0, 1, -2, 0])), ValueError, "test_labels"),
        (dict(test_labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "test_labels"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(epochs=2.0), ValueError, "epochs"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=math.nan), ValueError, "lr"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(device=0.5), TypeError, "device"),
        (dict(device="no-such-device"), ValueError, "device"),
    ],
)
def test_probe_rejects_bad_input(changes, error, name):
    with pytest.raises(error, match=name):
        linear_probe(**_arguments(**changes))
