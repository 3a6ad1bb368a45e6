"""Weighted k-nearest-neighbour evaluation of a representation (the kNN monitor of InstDisc and the authors).

For a query ``q`` and the training features ``x_j`` with labels ``y_j``, all L2-normalised:
``s_j = q·x_j`` (cosine similarity); ``N_k(q)`` is the set of the ``k`` largest ``s_j``; every neighbour
votes for its class with weight ``exp(s_j / T)``, and the prediction is the class with the largest summed
vote, ``argmax_c Σ_{j∈N_k(q)} exp(s_j / T)·[y_j = c]``. Defaults ``k = 20``, ``T = 0.1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weighted_knn_predict", "knn_top1_accuracy", "extract_features"]

# Queries are scored in chunks so that the [queries, train] similarity matrix stays small.
_QUERY_CHUNK = 1024


def _check_features(name: str, features: object) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains non-finite values")


def _check_labels(name: str, labels: object, count: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"{name} must have shape ({count},), got {tuple(labels.shape)}")
    if labels.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices")


def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Predicted class (``int64 [Q]``) of every row of ``query_features`` by the weighted vote above.

    Features need not be normalised (this function L2-normalises them); ``k`` must not exceed the number
    of training samples. Ties between classes go to the smaller class index.
    """
    _check_features("train_features", train_features)
    _check_features("query_features", query_features)
    _check_labels("train_labels", train_labels, train_features.shape[0])
    if query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"query_features has {query_features.shape[1]} dimensions but train_features has {train_features.shape[1]}"
        )
    if query_features.device != train_features.device or train_labels.device != train_features.device:
        raise ValueError("train_features, train_labels and query_features must be on the same device")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be an integer in [1, {train_features.shape[0]}] (the training set size), got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    dtype = torch.promote_types(train_features.dtype, query_features.dtype)
    train = F.normalize(train_features.to(dtype), dim=1)
    queries = F.normalize(query_features.to(dtype), dim=1)
    num_classes = int(train_labels.max()) + 1
    predictions = []
    for chunk in queries.split(_QUERY_CHUNK):
        similarity, neighbour = (chunk @ train.T).topk(k, dim=1)
        # Dividing every weight of a query by that of its nearest neighbour (topk sorts, so column 0)
        # does not change which class wins, and keeps exp away from overflow and all-zero underflow.
        weights = torch.exp((similarity - similarity[:, :1]) / temperature)
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=dtype, device=chunk.device)
        votes.scatter_add_(1, train_labels[neighbour], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Fraction of ``test_features`` whose :func:`weighted_knn_predict` class equals ``test_labels``."""
    predictions = weighted_knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature)
    _check_labels("test_labels", test_labels, test_features.shape[0])
    return (predictions == test_labels.to(predictions.device)).double().mean().item()


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """``model.features(images)`` in evaluation mode (BatchNorm running statistics), batch by batch.

    The model's training/evaluation mode is restored afterwards.
    """
    if not callable(getattr(model, "features", None)):
        raise TypeError(f"model must have a features(x) method, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty batched torch.Tensor")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.features(batch).flatten(1) for batch in images.split(batch_size)])
    finally:
        model.train(was_training)
