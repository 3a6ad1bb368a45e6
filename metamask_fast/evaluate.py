"""Weighted k-nearest-neighbour evaluation of a representation (the kNN monitor of InstDisc and the authors).

For a query ``q`` and the training features ``x_j`` with labels ``y_j``, all L2-normalised:
``s_j = q·x_j`` (cosine similarity); ``N_k(q)`` is the set of the ``k`` largest ``s_j``; every neighbour
votes for its class with weight ``exp(s_j / T)``, and the prediction is the class with the largest summed
vote, ``argmax_c Σ_{j∈N_k(q)} exp(s_j / T)·[y_j = c]``. Defaults ``k = 20``, ``T = 0.1``.

The linear probe (:func:`linear_probe`) is the standard offline linear evaluation on frozen features: one
linear layer trained with cross-entropy on the training set's features, standardised per dimension with the
training set's mean and standard deviation, and scored by top-1/top-5 accuracy (:func:`topk_accuracy`) on
the test set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metamask_fast._checks import check_number
from metamask_fast.config import TrainConfig
from metamask_fast.data.pipeline import Data, evaluation_loader
from metamask_fast.models import MetaMaskModel

__all__ = ["weighted_knn_predict", "knn_top1_accuracy", "extract_features", "topk_accuracy", "linear_probe",
           "knn_metric", "knn_accuracy", "knn_features", "knn_references", "batch_correlation", "dimension_counts",
           "dimension_analysis"]

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


# ------------------------------------------------------------------------------------------ linear probe

# The linear probe's default learning rate. The features are standardised and Adam's steps are per
# coordinate, so it does not depend on the features' scale or dimension. Measured on the digits split with
# the other defaults (100 epochs, batch 256: about 600 steps), test top-1 on raw 16×16 pixels / on
# random-init DigitsConvNet features: lr 1e-3 95.6 % / 88.3 % (under-trained), 1e-2 95.6 % / 94.4 %,
# 3e-2 95.3 % / 94.2 %; scikit-learn's LogisticRegression on the same standardised features 96.1 % / 94.4 %.
LINEAR_PROBE_LR = 1e-2
# Rows of logits scored at a time by topk_accuracy, and rows of features classified at a time.
_ROW_CHUNK = 4096


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of the rows of ``logits`` (``[N, C]``) whose label is among the ``k`` highest logits, for
    every ``k`` of ``ks``; returns ``{k: accuracy}`` in the order of ``ks``.

    A ``k`` larger than ``C`` counts as ``C`` (every label is then among the top ``k``). Ties are broken
    towards the smaller class index, as by ``argmax``: the label's rank is the number of classes with a
    larger logit plus the number of classes with an equal logit and a smaller index, and the label is
    among the top ``k`` when its rank is below ``k``. So constant logits score ``min(k, C) / C`` on
    uniformly spread labels, not 1.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty [N, C] tensor, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contains non-finite values")
    _check_labels("labels", labels, logits.shape[0])
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    num_classes = logits.shape[1]
    if labels.max() >= num_classes:
        raise ValueError(f"labels must be class indices below {num_classes} (the columns of logits), "
                         f"got {int(labels.max())}")
    if isinstance(ks, (int, str)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of integers, got {ks!r}")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")

    columns = torch.arange(num_classes, device=logits.device)
    ranks = []
    for chunk, chunk_labels in zip(logits.split(_ROW_CHUNK), labels.split(_ROW_CHUNK)):
        own = chunk.gather(1, chunk_labels[:, None])
        ahead = (chunk > own) | ((chunk == own) & (columns < chunk_labels[:, None]))
        ranks.append(ahead.sum(dim=1))
    rank = torch.cat(ranks)
    return {k: (rank < k).double().mean().item() for k in ks}


def _check_probe_labels(name: str, labels: object, count: int) -> None:
    if isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.numel() and (labels == -1).any():
        raise ValueError(f"{name} contains -1 (unlabeled samples); the linear probe needs class indices >= 0, "
                         f"so pass only the labeled samples (features[{name} >= 0], {name}[{name} >= 0])")
    _check_labels(name, labels, count)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Linear evaluation of frozen features: train one ``nn.Linear`` on the training features, score it on
    the test features.

    Protocol, all in float32 on ``device`` (default: that of ``train_features``):

    1. Standardise: ``x' = (x - μ) / σ`` with ``μ``, ``σ`` the training features' per-dimension mean and
       (population) standard deviation, computed in float64; a dimension that is constant over the training
       set keeps ``σ = 1`` (and ``μ`` its value), so it maps to 0. The test features use the same ``μ``, ``σ``.
    2. Classifier: ``nn.Linear(D, C)`` with ``C = 1 + max`` label of both sets, weight and bias initialised
       to zero (the problem is convex, so no random initialisation is needed).
    3. Optimiser: AdamW (betas 0.9/0.999, eps 1e-8) at ``lr`` (default :data:`LINEAR_PROBE_LR`,
       1e-2), decoupled ``weight_decay`` on the weight only, the learning rate annealed by a cosine from
       ``lr`` to 0 over all ``epochs × ceil(N / batch_size)`` steps (stepped after every mini-batch). Adam's
       per-coordinate step sizes make one default work for any feature dimension and set size, where SGD's
       learning rate would have to be tuned to them.
    4. Mini-batches: every epoch a fresh permutation of the training set from a ``torch.Generator`` seeded
       with ``seed`` (on the CPU, whatever the device), cut into batches of ``batch_size`` (the last one may
       be smaller); loss the mean cross-entropy of the batch.
    5. Score: top-1 and top-5 accuracy (:func:`topk_accuracy`) of the final classifier on the test set,
       top-1 accuracy and mean cross-entropy on the training set.

    The result is deterministic: the same inputs and ``seed`` give the same numbers on the same device and
    thread count. Labels must be int64 class indices; a training label of -1 (an unlabeled sample, as in
    STL-10's ``train+unlabeled``) raises ``ValueError``: filter those samples out first.

    Returns a dict of plain Python numbers, JSON-ready: ``top1``, ``top5``, ``train_top1``, ``train_loss``,
    ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``seed``, ``num_classes``, ``num_train``,
    ``num_test``; plus ``state``, a dict of CPU float32 tensors ``mean`` and ``std`` ([D], the
    standardisation) and ``weight`` ([C, D]) and ``bias`` ([C]), the classifier, so that
    ``((x - mean) / std) @ weight.T + bias`` are its logits for new features ``x``.
    """
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    _check_probe_labels("train_labels", train_labels, train_features.shape[0])
    _check_probe_labels("test_labels", test_labels, test_features.shape[0])
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features has {test_features.shape[1]} dimensions but train_features has {train_features.shape[1]}"
        )
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    lr = LINEAR_PROBE_LR if lr is None else check_number("lr", lr, minimum=0.0, strict=True)
    weight_decay = check_number("weight_decay", weight_decay, minimum=0.0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device) if device is not None else train_features.device
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a valid torch device: {error}") from error

    # Usable from inside torch.no_grad() / torch.inference_mode() (a trainer's evaluation block).
    with torch.inference_mode(False), torch.enable_grad():
        return _linear_probe(train_features, train_labels, test_features, test_labels, epochs=epochs,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, device=device)


def _linear_probe(train_features, train_labels, test_features, test_labels, *, epochs, batch_size, lr,
                  weight_decay, seed, device) -> dict:
    train_x = train_features.detach().to(device, torch.float32)
    test_x = test_features.detach().to(device, torch.float32)
    train_y = train_labels.detach().to(device)
    test_y = test_labels.detach().to(device)

    wide = train_x.double()
    mean, std = wide.mean(dim=0), wide.std(dim=0, unbiased=False)
    constant = (train_x == train_x[:1]).all(dim=0)
    mean = torch.where(constant, train_x[0].double(), mean).float()
    std = torch.where(constant, torch.ones_like(std), std).float()
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std

    num_train, dim = train_x.shape
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    classifier = nn.Linear(dim, num_classes, device=device, dtype=torch.float32)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(
        [{"params": [classifier.weight], "weight_decay": weight_decay},
         {"params": [classifier.bias], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8,
    )
    steps_per_epoch = -(-num_train // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)

    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(num_train, generator=generator).to(device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

    classifier.eval()
    with torch.no_grad():
        train_logits = torch.cat([classifier(chunk) for chunk in train_x.split(_ROW_CHUNK)])
        test_logits = torch.cat([classifier(chunk) for chunk in test_x.split(_ROW_CHUNK)])
        train_loss = F.cross_entropy(train_logits, train_y).item()
    test_accuracy = topk_accuracy(test_logits, test_y, ks=(1, 5))
    return {
        "top1": test_accuracy[1],
        "top5": test_accuracy[5],
        "train_top1": topk_accuracy(train_logits, train_y, ks=(1,))[1],
        "train_loss": train_loss,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "num_classes": num_classes,
        "num_train": num_train,
        "num_test": test_x.shape[0],
        "state": {
            "mean": mean.cpu(),
            "std": std.cpu(),
            "weight": classifier.weight.detach().cpu().clone(),
            "bias": classifier.bias.detach().cpu().clone(),
        },
    }


# ---------------------------------------------------------------------------------------------- a run's kNN monitor


def knn_metric(config: TrainConfig) -> str:
    """The kNN monitor's metric name, which carries its protocol: ``knn_k200_t0.1_top1``."""
    return f"knn_k{config.knn_k}_t{config.knn_temperature:g}_top1"


@torch.no_grad()
def _loader_features(model: MetaMaskModel, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        features, labels = [], []
        for images, batch_labels in loader:
            features.append(model.features(images.to(device, non_blocking=True)).float())
            labels.append(batch_labels)
        features, labels = torch.cat(features), torch.cat(labels).to(device)
        keep = labels >= 0  # unreadable images (label -1) are left out of the evaluation
        return features[keep], labels[keep]
    finally:
        model.train(was_training)


def knn_features(model: MetaMaskModel, data: Data, config: TrainConfig,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The kNN monitor's masked features and labels, ``(train, train labels, test, test labels)`` on
    ``device``, or None without labelled splits."""
    if data.digits is not None:
        split = data.digits
        return (extract_features(model, split.train_images.to(device)), split.train_labels.to(device),
                extract_features(model, split.test_images.to(device)), split.test_labels.to(device))
    if data.memory is None:
        return None
    workers = min(config.workers, 4)
    train_features, train_labels = _loader_features(
        model, evaluation_loader(config.dataset, data.memory, config.image_size, workers), device)
    test_features, test_labels = _loader_features(
        model, evaluation_loader(config.dataset, data.queries, config.image_size, workers), device)
    return train_features, train_labels, test_features, test_labels


def knn_accuracy(model: MetaMaskModel, data: Data, config: TrainConfig, device: torch.device) -> float | None:
    """The kNN monitor (masked features, cosine, k, T of ``config``), or None without labelled splits."""
    features = knn_features(model, data, config, device)
    if features is None:
        return None
    return knn_top1_accuracy(*features, k=config.knn_k, temperature=config.knn_temperature)


def dimension_counts(dims: int, points: int = 12) -> list[int]:
    """About ``points`` numbers of kept dimensions from 1 to ``dims``, evenly spaced on a log scale."""
    return sorted({max(1, min(dims, round(dims ** (i / (points - 1))))) for i in range(points)} | {1, dims})


@torch.no_grad()
def dimension_analysis(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       test_labels: torch.Tensor, mask: torch.Tensor, *, k: int, temperature: float,
                       draws: int = 5, seed: int = 0) -> dict:
    """The paper's dimensional analysis: kNN top-1 (cosine, ``k``, ``temperature``) of the masked features
    keeping only the ``n`` dimensions with the highest mask values, the ``n`` lowest, and ``n`` at random
    (the mean over ``draws`` draws of a generator seeded with ``seed``), for ``n`` in
    :func:`dimension_counts`; ties between equal mask values are broken by index. Returns ``dims`` (the
    ``n``), ``highest``, ``lowest``, ``random`` (lists, one value per ``n``) and ``all`` (every dimension)."""
    dims = train_features.shape[1]
    mask = mask.detach().flatten().to(torch.float64).cpu()
    if mask.numel() != dims:
        raise ValueError(f"mask must have one value per feature dimension ({dims}), got {mask.numel()}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    order = torch.argsort(-mask, stable=True).to(train_features.device)  # highest first, ties by index
    generator = torch.Generator().manual_seed(seed)

    def accuracy(kept: torch.Tensor) -> float:
        return knn_top1_accuracy(train_features[:, kept], train_labels, test_features[:, kept], test_labels,
                                 k=k, temperature=temperature)

    result = {"dims": dimension_counts(dims), "highest": [], "lowest": [], "random": [],
              "all": accuracy(order), "draws": draws, "k": k, "temperature": temperature}
    for n in result["dims"]:
        result["highest"].append(accuracy(order[:n]))
        result["lowest"].append(accuracy(order[dims - n:]))
        picks = [torch.randperm(dims, generator=generator)[:n].to(train_features.device) for _ in range(draws)]
        result["random"].append(sum(accuracy(p) for p in picks) / draws)
    return result


@torch.no_grad()
def batch_correlation(model: MetaMaskModel, data: Data, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The Barlow Twins cross-correlation matrix (standardised embeddings, SPEC §1) of the two views of the
    first training batch, evaluation mode: the matrix the redundancy loss drives towards the identity."""
    was_training = model.training
    model.eval()
    try:
        x0, x1 = next(iter(data.batches.epoch(0)))
        z0, z1 = model(x0)[0].double(), model(x1)[0].double()
        z0, z1 = ((z - z.mean(0)) / z.std(0).clamp_min(1e-12) for z in (z0, z1))
        return (z0.T @ z1 / z0.shape[0]).float().cpu()
    finally:
        model.train(was_training)


def knn_references(model: MetaMaskModel, data: Data, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """What the digits' kNN monitor is compared with: raw pixels, and ``model`` at its random initialisation."""
    split = data.digits
    raw = knn_top1_accuracy(split.train_images.flatten(1), split.train_labels, split.test_images.flatten(1),
                            split.test_labels, k=config.knn_k, temperature=config.knn_temperature)
    return {"knn_raw_pixels": raw, "knn_random_init": knn_accuracy(model, data, config, device)}
