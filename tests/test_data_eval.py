"""Digits split, augmentation, batching, backbone and the weighted kNN monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metamask_fast.backbones import DigitsConvNet
from metamask_fast.data import DigitAugmentation, DigitsSplit, load_digits_split, shuffled_batches
from metamask_fast.evaluate import extract_features, knn_top1_accuracy, weighted_knn_predict
from metamask_fast.models import MetaMaskModel


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


# ---------------------------------------------------------------------------------------------- split


def test_split_sizes_types_and_range(split):
    assert split.train_images.shape == (1437, 1, 16, 16)
    assert split.test_images.shape == (360, 1, 16, 16)
    assert split.train_images.dtype == split.test_images.dtype == torch.float32
    assert split.train_labels.dtype == split.test_labels.dtype == torch.int64
    assert split.train_labels.shape == (1437,) and split.test_labels.shape == (360,)
    for images in (split.train_images, split.test_images):
        assert images.min() >= 0 and images.max() <= 1
    assert split.num_classes == 10


def test_split_is_stratified(split):
    from sklearn.datasets import load_digits

    everything = np.bincount(load_digits().target, minlength=10)
    train = np.bincount(split.train_labels.numpy(), minlength=10)
    test = np.bincount(split.test_labels.numpy(), minlength=10)
    np.testing.assert_array_equal(train + test, everything)
    # Stratified: each class keeps its 20 % share of the test set to within one image.
    assert np.all(np.abs(test - 0.2 * everything) <= 1)


def test_split_is_deterministic_and_independent_of_torch_seed(split):
    torch.manual_seed(1234)
    again = load_digits_split()
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(split, name), getattr(again, name)), name


def test_split_keeps_8x8_content_when_not_upsampled():
    from sklearn.datasets import load_digits

    raw = load_digits_split(image_size=8)
    assert raw.train_images.shape[-2:] == (8, 8)
    pool = {tuple(img.ravel()) for img in load_digits().images / 16.0}
    assert tuple(raw.test_images[0, 0].double().numpy().ravel()) in pool


@pytest.mark.parametrize(
    "kwargs, name",
    [({"test_fraction": 0.0}, "test_fraction"), ({"test_fraction": 1.5}, "test_fraction"),
     ({"image_size": 0}, "image_size")],
)
def test_split_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_digits_split(**kwargs)


def test_split_rejects_non_integer_seed():
    with pytest.raises(TypeError, match="seed"):
        load_digits_split(seed=0.5)


# ------------------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_shape_dtype_and_range(split):
    images = split.train_images[:33]
    view = DigitAugmentation()(images, torch.Generator().manual_seed(0))
    assert view.shape == images.shape and view.dtype == images.dtype
    assert view.min() >= 0 and view.max() <= 1
    assert torch.isfinite(view).all()


def test_augmentation_is_seeded_and_views_differ(split):
    images = split.train_images[:17]
    augment = DigitAugmentation()
    first = torch.Generator().manual_seed(7)
    second = torch.Generator().manual_seed(7)
    view0, view1 = augment(images, first), augment(images, first)
    assert torch.equal(view0, augment(images, second))
    assert torch.equal(view1, augment(images, second))
    assert not torch.allclose(view0, view1)
    assert not torch.allclose(view0, images)
    # Every image gets its own random draw: two copies of one digit come out different.
    twins = augment(images[:1].repeat(2, 1, 1, 1), first)
    assert not torch.allclose(twins[0], twins[1])


def test_zero_strength_augmentation_is_the_identity(split):
    images = split.train_images[:9]
    identity = DigitAugmentation(max_rotation_deg=0, min_zoom=1, max_zoom=1, max_shift_px=0, contrast=0,
                                 brightness=0, max_noise_std=0)
    torch.testing.assert_close(identity(images, torch.Generator().manual_seed(0)), images, atol=1e-6, rtol=0)


def test_augmentation_warps_but_keeps_the_digit_recognisable(split):
    """The warp is weak: an augmented view stays closer to its own digit than to most other digits."""
    images = split.train_images[:64]
    view = DigitAugmentation()(images, torch.Generator().manual_seed(3))
    flat_images, flat_view = images.flatten(1), view.flatten(1)
    similarity = torch.nn.functional.normalize(flat_view, dim=1) @ torch.nn.functional.normalize(flat_images, dim=1).T
    rank_of_own = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
    assert (rank_of_own < 5).float().mean() > 0.9


def test_augmentation_rejects_bad_input(split):
    augment = DigitAugmentation()
    generator = torch.Generator()
    with pytest.raises(TypeError, match="images"):
        augment(split.train_images.numpy(), generator)
    with pytest.raises(ValueError, match="images"):
        augment(split.train_images[0], generator)
    with pytest.raises(TypeError, match="images"):
        augment(split.train_images[:2].to(torch.int64), generator)
    with pytest.raises(TypeError, match="generator"):
        augment(split.train_images[:2], 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"max_rotation_deg": -1}, "max_rotation_deg"), ({"max_noise_std": math.nan}, "max_noise_std"),
     ({"contrast": -0.1}, "contrast"), ({"min_zoom": 1.2, "max_zoom": 1.1}, "min_zoom"),
     ({"min_zoom": 0.0}, "min_zoom")],
)
def test_augmentation_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitAugmentation(**kwargs)


# ------------------------------------------------------------------------------------------ batches


def test_shuffled_batches_drop_the_last_incomplete_batch():
    batches = list(shuffled_batches(23, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 4 and all(b.shape == (5,) for b in batches)
    seen = torch.cat(batches)
    assert seen.unique().numel() == 20 and seen.min() >= 0 and seen.max() < 23


def test_shuffled_batches_are_seeded_and_reshuffle_each_epoch():
    generator = torch.Generator().manual_seed(0)
    epoch0 = torch.cat(list(shuffled_batches(50, 7, generator)))
    epoch1 = torch.cat(list(shuffled_batches(50, 7, generator)))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, torch.cat(list(shuffled_batches(50, 7, torch.Generator().manual_seed(0)))))


@pytest.mark.parametrize("num_samples, batch_size, name", [(0, 1, "num_samples"), (10, 11, "batch_size"),
                                                            (10, 0, "batch_size")])
def test_shuffled_batches_reject_bad_sizes(num_samples, batch_size, name):
    with pytest.raises(ValueError, match=name):
        next(shuffled_batches(num_samples, batch_size, torch.Generator()))


# --------------------------------------------------------------------------------------------- backbone


def test_digits_convnet_shape_and_size():
    net = DigitsConvNet()
    assert net.feature_dim == 64
    assert net(torch.rand(3, 1, 16, 16)).shape == (3, 64)
    assert sum(p.numel() for p in net.parameters()) == 72016
    strides = [m.stride[0] for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1, 1, 2, 1, 2, 1]


@pytest.mark.parametrize("kwargs, name", [({"widths": ()}, "widths"), ({"in_channels": 0}, "in_channels"),
                                          ({"downsample_layers": (9,)}, "downsample_layers")])
def test_digits_convnet_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsConvNet(**kwargs)


# ------------------------------------------------------------------------------------------------- kNN


def reference_weighted_knn(train, train_labels, queries, k, temperature):
    """Independent transcription: float64, per query, sorted neighbours, a dictionary of votes."""
    train = train.double().numpy()
    queries = queries.double().numpy()
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    predictions = []
    for query in queries:
        similarities = train @ query
        nearest = sorted(range(len(train)), key=lambda j: -similarities[j])[:k]
        votes: dict[int, float] = {}
        for j in nearest:
            label = int(train_labels[j])
            votes[label] = votes.get(label, 0.0) + math.exp(similarities[j] / temperature)
        best = max(votes.values())
        predictions.append(min(label for label, vote in votes.items() if vote == best))
    return torch.tensor(predictions)


@pytest.mark.parametrize("num_train, num_queries, dim, num_classes, k, temperature", [
    (37, 13, 5, 3, 7, 0.1), (101, 29, 17, 7, 20, 0.1), (53, 31, 3, 4, 1, 0.5), (23, 11, 9, 5, 23, 0.07),
])
def test_weighted_knn_matches_brute_force_reference(num_train, num_queries, dim, num_classes, k, temperature):
    generator = torch.Generator().manual_seed(num_train)
    train = torch.randn(num_train, dim, generator=generator)
    labels = torch.randint(num_classes, (num_train,), generator=generator)
    queries = torch.randn(num_queries, dim, generator=generator)
    expected = reference_weighted_knn(train, labels, queries, k, temperature)
    assert torch.equal(weighted_knn_predict(train, labels, queries, k=k, temperature=temperature), expected)
    accuracy = knn_top1_accuracy(train, labels, queries, expected, k=k, temperature=temperature)
    assert accuracy == 1.0


def test_weighted_knn_weights_votes_by_similarity():
    # Two close neighbours of class 1 outvote three distant ones of class 0 at a low temperature; a plain
    # majority vote would pick class 0.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.02]])
    assert weighted_knn_predict(train, labels, query, k=5, temperature=0.1).item() == 1


def test_weighted_knn_separable_clusters_are_perfect():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    train_labels = torch.arange(4).repeat_interleave(15)
    test_labels = torch.arange(4).repeat(9)
    train = centres[train_labels] + torch.randn(60, 4, generator=generator)
    test = centres[test_labels] + torch.randn(36, 4, generator=generator)
    assert knn_top1_accuracy(train, train_labels, test, test_labels, k=20, temperature=0.1) == 1.0


def test_weighted_knn_survives_tiny_temperatures():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(40, 6, generator=generator)
    labels = torch.randint(3, (40,), generator=generator)
    queries = torch.randn(10, 6, generator=generator)
    # At T → 0 the vote is the nearest neighbour's label; exp must neither overflow nor vanish.
    nearest = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(train, dim=1).T).argmax(1)
    assert torch.equal(weighted_knn_predict(train, labels, queries, k=10, temperature=1e-4), labels[nearest])


def test_weighted_knn_rejects_bad_input():
    train, labels, queries = torch.randn(10, 3), torch.randint(2, (10,)), torch.randn(4, 3)
    cases = [
        (ValueError, "k", dict(k=11)),
        (ValueError, "k", dict(k=0)),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "temperature", dict(temperature=math.inf)),
        (ValueError, "query_features", dict(query_features=torch.randn(4, 5))),
        (ValueError, "train_features", dict(train_features=torch.full((10, 3), math.nan))),
        (ValueError, "train_features", dict(train_features=torch.randn(10))),
        (TypeError, "train_features", dict(train_features=train.numpy())),
        (TypeError, "train_labels", dict(train_labels=labels.float())),
        (ValueError, "train_labels", dict(train_labels=labels[:9])),
    ]
    for error, name, override in cases:
        arguments = dict(train_features=train, train_labels=labels, query_features=queries, k=3, temperature=0.1)
        arguments.update(override)
        with pytest.raises(error, match=name):
            weighted_knn_predict(arguments.pop("train_features"), arguments.pop("train_labels"),
                                 arguments.pop("query_features"), **arguments)
    with pytest.raises(ValueError, match="test_labels"):
        knn_top1_accuracy(train, labels, queries, torch.zeros(5, dtype=torch.int64), k=3)


def test_extract_features_uses_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    backbone = DigitsConvNet()
    model = MetaMaskModel(backbone, backbone.feature_dim, (32, 32), (16,))
    images = torch.rand(10, 1, 16, 16)
    model.train()
    model(images)  # moves the BatchNorm running statistics away from their initial values
    features = extract_features(model, images, batch_size=3)
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(images))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, images, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        extract_features(backbone, images)
