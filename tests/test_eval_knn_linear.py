"""k-NN and linear-probe classification of frozen features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from eval.knn import knn_accuracy, knn_scores, nearest_neighbours, weighted_vote
from eval.linear_cls import (
    LinearProbeConfig,
    class_token_features,
    extract_features,
    fit_grid,
    split_holdout,
    train_linear_probe,
)


def _clusters(
    num_classes: int, per_class: int, dim: int = 16, noise: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples around orthogonal class centres: separable by construction."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes] * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + noise * 3 * torch.randn(labels.shape[0], dim, generator=gen)
    return features, labels


# ------------------------------------------------------------------------- k-NN

# Query (1, 0) against four unit vectors: similarities 1 (class 0), 0.8 and 0.6 (class 1)
# and -1 (class 0, never among the 3 nearest).
BANK = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[1.0, 0.0]])


def test_weighted_vote_by_hand() -> None:
    # k = 3, T = 0.5: class 0 gets e^(1/0.5) = e^2 ~ 7.39, class 1 gets e^1.6 + e^1.2 ~ 8.27,
    # so two fairly close neighbours outvote the nearest one.
    scores = knn_scores(BANK, BANK_LABELS, QUERY, num_classes=2, ks=(3,), temperature=0.5)[3]
    assert scores[0].tolist() == pytest.approx([math.exp(2), math.exp(1.6) + math.exp(1.2)])
    assert int(scores.argmax()) == 1
    # T = 0.07 sharpens the weights: e^(1/0.07) ~ 1.6e6 beats e^(0.8/0.07) + e^(0.6/0.07).
    sharp = knn_scores(BANK, BANK_LABELS, QUERY, num_classes=2, ks=(3,), temperature=0.07)[3]
    expected = [math.exp(1 / 0.07), math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)]
    assert sharp[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert int(sharp.argmax()) == 0


def test_neighbours_sorted_and_features_normalised() -> None:
    scaled_bank = BANK * torch.tensor([[5.0], [0.1], [2.0], [3.0]])
    sims, labels = nearest_neighbours(QUERY, F.normalize(scaled_bank, dim=1), BANK_LABELS, 3)
    assert sims[0].tolist() == pytest.approx([1.0, 0.8, 0.6])
    assert labels[0].tolist() == [0, 1, 1]
    unscaled = knn_scores(BANK, BANK_LABELS, QUERY * 7, 2, ks=(3,))[3]
    assert torch.allclose(knn_scores(scaled_bank, BANK_LABELS, QUERY, 2, ks=(3,))[3], unscaled)


def test_vote_ignores_padding_with_minus_infinity() -> None:
    sims = torch.tensor([[0.5, float("-inf")]])
    scores = weighted_vote(sims, torch.tensor([[1, 0]]), num_classes=2, temperature=0.1)
    assert scores[0].tolist() == pytest.approx([0.0, math.exp(5)])


def test_separated_clusters_are_classified_perfectly() -> None:
    train, train_labels = _clusters(4, per_class=60, seed=0)
    test, test_labels = _clusters(4, per_class=25, seed=1)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, num_classes=4)
    assert set(accuracy) == {10, 20, 100, 200}
    assert all(acc[1] == 1.0 and acc[5] == 1.0 for acc in accuracy.values())


def test_chunking_does_not_change_scores() -> None:
    train, train_labels = _clusters(5, per_class=20, noise=0.8, seed=0)
    test, _ = _clusters(5, per_class=7, noise=0.8, seed=1)
    whole = knn_scores(train, train_labels, test, 5, ks=(10, 20), chunk_size=1000)
    chunked = knn_scores(train, train_labels, test, 5, ks=(10, 20), chunk_size=4)
    assert all(torch.allclose(whole[k], chunked[k]) for k in (10, 20))


def test_k_larger_than_bank_is_an_error() -> None:
    with pytest.raises(ValueError, match="k = 200 neighbours requested from a bank of 4"):
        knn_scores(BANK, BANK_LABELS, QUERY, 2)


def _sharded_knn_worker(rank: int, store: str) -> None:
    train, train_labels = _clusters(5, per_class=30, noise=0.8, seed=0)
    test, _ = _clusters(5, per_class=8, noise=0.8, seed=1)
    reference = knn_scores(train, train_labels, test, 5, ks=(5, 20))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # Uneven shards, one smaller than the largest k: its candidates must be padded.
        mine = slice(0, 140) if rank == 0 else slice(140, None)
        sharded = knn_scores(train[mine], train_labels[mine], test, 5, ks=(5, 20), chunk_size=9)
        for k in (5, 20):
            assert torch.allclose(sharded[k], reference[k], rtol=1e-5), k
    finally:
        dist.destroy_process_group()


def test_sharded_bank_gives_the_same_scores(tmp_path) -> None:
    mp.spawn(_sharded_knn_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


# ---------------------------------------------------------------- linear probe

SMALL_GRID = LinearProbeConfig(lrs=(1e-6, 1e-3, 1e-1), epochs=10, batch_size=64)


def test_probe_learns_separable_data_and_picks_lr_on_holdout() -> None:
    train, train_labels = _clusters(3, per_class=200, noise=0.2, seed=0)
    val, val_labels = _clusters(3, per_class=100, noise=0.2, seed=1)
    result = train_linear_probe(train, train_labels, val, val_labels, 3, SMALL_GRID)
    assert set(result.holdout_top1) == set(SMALL_GRID.lrs)
    assert result.holdout_top1[result.best_lr] == max(result.holdout_top1.values())
    # 1e-3 and 1e-1 both reach 100% on the holdout; a tie goes to the smaller rate.
    assert result.best_lr == 1e-3
    assert result.holdout_top1[1e-6] < 0.95
    assert result.val_accuracy[1] > 0.95 and result.val_accuracy[5] == 1.0
    logits = result.classifier(val)
    assert (logits.argmax(dim=1) == val_labels).float().mean() == result.val_accuracy[1]


def test_probe_with_adamw() -> None:
    train, train_labels = _clusters(4, per_class=100, noise=0.2, seed=0)
    val, val_labels = _clusters(4, per_class=50, noise=0.2, seed=1)
    config = LinearProbeConfig(lrs=(1e-3, 1e-2), epochs=5, batch_size=64, optimizer="adamw")
    result = train_linear_probe(train, train_labels, val, val_labels, 4, config)
    assert result.val_accuracy[1] > 0.95


def test_grid_heads_train_as_if_alone() -> None:
    # The heads share no parameter and see the same batches, so the head for lr 1e-2 must
    # come out the same whether or not other learning rates are trained beside it.
    features, labels = _clusters(3, per_class=40, noise=0.5)
    together = fit_grid(features, labels, 3, LinearProbeConfig(lrs=(1e-2, 1e-1), epochs=3))
    alone = fit_grid(features, labels, 3, LinearProbeConfig(lrs=(1e-2,), epochs=3))
    assert torch.allclose(together.heads[0].weight, alone.heads[0].weight, atol=1e-6)
    assert not torch.allclose(together.heads[1].weight, alone.heads[0].weight, atol=1e-3)


def test_holdout_split_is_disjoint_and_complete() -> None:
    fit, holdout = split_holdout(50, 0.2, seed=3)
    assert len(holdout) == 10 and len(fit) == 40
    assert sorted(torch.cat([fit, holdout]).tolist()) == list(range(50))
    assert torch.equal(split_holdout(50, 0.2, seed=3)[1], holdout)
    with pytest.raises(ValueError, match="holdout fraction"):
        split_holdout(50, 1.0)


def test_unknown_optimizer_is_an_error() -> None:
    features, labels = _clusters(2, per_class=5)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        fit_grid(features, labels, 2, LinearProbeConfig(optimizer="lbfgs"))


class TokenBackbone(nn.Module):
    """Returns fixed, recognisable tokens: layer i has patch tokens i and [CLS] 10 * i."""

    patch_size = 4
    embed_dim = 3

    def get_intermediate_layers(self, x, n, reshape, return_class_token, norm):
        batch, grid = x.shape[0], x.shape[-1] // self.patch_size
        layers = []
        for i in range(1, 5):
            patch = torch.full((batch, self.embed_dim, grid, grid), float(i))
            patch[:, 0, 0, 0] += 4.0  # the mean over 4 patches of channel 0 is i + 1
            layers.append((patch, torch.full((batch, self.embed_dim), 10.0 * i)))
        return tuple(layers[-n:])


def test_class_token_features_layout() -> None:
    images = torch.zeros(2, 3, 8, 8)
    last = class_token_features(TokenBackbone(), images)
    assert last.tolist() == [[40.0] * 3] * 2
    four = class_token_features(TokenBackbone(), images, n_last_blocks=4, avgpool=True)
    expected = [10.0] * 3 + [20.0] * 3 + [30.0] * 3 + [40.0] * 3 + [5.0, 4.0, 4.0]
    assert four.shape == (2, 15) and four[1].tolist() == expected


def test_extract_features_concatenates_batches() -> None:
    batches = [
        (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])),
        (torch.zeros(3, 3, 8, 8), torch.tensor([2, 2, 1])),
    ]
    features, labels = extract_features(TokenBackbone(), batches, n_last_blocks=2)
    assert features.shape == (5, 6) and labels.tolist() == [0, 1, 2, 2, 1]
