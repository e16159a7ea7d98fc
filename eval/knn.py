"""Weighted k-NN classification of frozen features (DINO's protocol, SPEC section 5).

Each test sample is compared by cosine similarity with every training sample; its k
nearest neighbours vote for their class with weight exp(similarity / T). The bank of
training features may be split across ranks: each rank finds its own k best candidates,
the candidates (not the bank) are gathered, and the global k best are kept, so memory
per rank is one shard plus `chunk_size` x bank-shard similarities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from eval.metrics import communication_device, sum_across_ranks, topk_accuracy

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_candidates(values: torch.Tensor) -> torch.Tensor:
    """Every rank's (Q, k) candidates side by side: (Q, world * k), on the device of
    `values` (a bank kept in host memory stays there under NCCL too)."""
    if not _distributed():
        return values
    sent = values.to(communication_device(values)).contiguous()
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, sent)
    return torch.cat(parts, dim=1).to(values.device)


def _local_candidates(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's k best (similarity, label), padded with similarity -inf where the shard
    holds fewer than k samples: exp(-inf / T) = 0, so padding never votes."""
    available = min(k, bank.shape[0])
    sims, index = (queries @ bank.T).topk(available, dim=1)
    labels = bank_labels[index]
    missing = k - available
    if missing:
        sims = F.pad(sims, (0, missing), value=float("-inf"))
        labels = F.pad(labels, (0, missing), value=0)
    return sims, labels


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and labels (Q, k) of the k most similar bank entries over all ranks,
    most similar first. Inputs are assumed L2-normalised."""
    sims, labels = _local_candidates(queries, bank, bank_labels, k)
    sims, labels = _gather_candidates(sims), _gather_candidates(labels)
    sims, order = sims.topk(k, dim=1)
    return sims, labels.gather(1, order)


def weighted_vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (Q, C): the sum of exp(sim / T) over the neighbours of each class."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, labels, weights)


def _check_bank_size(bank: torch.Tensor, k: int) -> None:
    total = int(sum_across_ranks(torch.tensor(bank.shape[0], device=bank.device)))
    if k > total:
        raise ValueError(f"k = {k} neighbours requested from a bank of {total} samples")


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 256,
) -> dict[int, torch.Tensor]:
    """Vote scores (Q, C) of every test sample for each k.

    `train_features` is this rank's shard of the bank; `test_features` must be the same
    on every rank. One search for the largest k serves all k, since the first k of the
    sorted max(ks) neighbours are the k nearest.
    """
    k_max = max(ks)
    _check_bank_size(train_features, k_max)
    bank = F.normalize(train_features.float(), dim=1)
    bank_labels = train_labels.long()
    all_queries = F.normalize(test_features.float(), dim=1)
    chunks: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for queries in all_queries.split(chunk_size):
        sims, labels = nearest_neighbours(queries, bank, bank_labels, k_max)
        for k in ks:
            chunks[k].append(weighted_vote(sims[:, :k], labels[:, :k], num_classes, temperature))
    return {k: torch.cat(parts) for k, parts in chunks.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 256,
) -> dict[int, dict[int, float]]:
    """{k: {1: top-1, 5: top-5}} of the weighted k-NN classifier on the test set."""
    scores = knn_scores(
        train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size
    )
    target = test_labels.to(test_features.device)
    return {k: topk_accuracy(s, target, (1, 5)) for k, s in scores.items()}
