"""Distillation transfers what a teacher knows (issue #24 item 3): a small student trained
against a knowing frozen teacher beats the same student trained from scratch for the same
iterations, and its features come to resemble the teacher's.

The teacher is made to know something cheaply: a larger ViT trained with labels on
single-object synthetic scenes (k-NN 62.7% on held-out scenes, chance 12.5%). Nothing of
the labels reaches the students, which both run the self-supervised recipe on the usual
synthetic data; the only difference between the two runs is `distill.teacher`, so a
distillation that did nothing would give the scratch student's numbers exactly.

Measured on the development machine (2026-12-07, 2-vCPU x86, torch 2.14 CPU): teacher
k-NN@20 62.7%; scratch 14.6%, distilled 17.8%; linear CKA to the teacher's features 0.027
and 0.058. A student of this size trained with labels for the same 600 steps reached 23%
in a prototype, so this budget, not distillation, keeps the students far below the teacher;
the margins asserted are about two thirds of those measured. With both students at
train.seed 1 and 2 instead (same teacher) the margins were wider: k-NN +4.3 and +7.0
points, CKA 3.9x and 2.9x.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_helpers import tiny_config

from dinospec.data.synthetic import SyntheticScenes
from dinospec.data.transforms import normalize
from dinospec.models import build_backbone
from dinospec.models.checkpoints import load_backbone, save_backbone
from dinospec.run.layout import RunDir
from dinospec.train.loop import train
from eval.knn import knn_accuracy

NUM_CLASSES = 8
STUDENT_RUN = [
    "data.synthetic_size=512",
    "data.num_workers=1",
    "train.batch_size_per_gpu=32",
    "train.epoch_length=200",
    "train.checkpoint_every=1000",
    "train.log_every=100",
    "optim.base_lr=0.06",
    "teacher.momentum_teacher=0.9",
    "teacher.final_momentum_teacher=0.99",
]


def labelled_scenes(size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Single-object scenes (so each label names the whole image) as one normalized batch."""
    scenes = SyntheticScenes(
        size=size, image_size=32, seed=seed, max_objects=1, transform=normalize()
    )
    items = [scenes[i] for i in range(size)]
    return torch.stack([image for image, _, _ in items]), torch.tensor([y for _, _, y in items])


@torch.no_grad()
def cls_features(model: nn.Module, images: Tensor) -> Tensor:
    model.eval()
    return F.normalize(torch.cat([model(chunk) for chunk in images.split(512)]), dim=-1)


def knn_top1(
    model: nn.Module, bank: tuple[Tensor, Tensor], queries: tuple[Tensor, Tensor]
) -> float:
    scores = knn_accuracy(
        cls_features(model, bank[0]),
        bank[1],
        cls_features(model, queries[0]),
        queries[1],
        NUM_CLASSES,
        ks=(20,),
    )
    return scores[20][1]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019): 1 when two feature sets
    differ by a rotation and scale, near 0 when unrelated; it compares networks of
    different widths, as student and teacher are here."""
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def supervised(model: nn.Module, data: tuple[Tensor, Tensor], steps: int, batch: int) -> None:
    """Train a backbone with a linear classifier on its [CLS] (AdamW, horizontal flips)."""
    torch.manual_seed(0)
    head = nn.Linear(model.embed_dim, NUM_CLASSES)
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05
    )
    images, labels = data
    model.train()
    for _ in range(steps):
        index = torch.randint(len(images), (batch,))
        flip = torch.rand(batch) < 0.5
        x = torch.where(flip[:, None, None, None], images[index].flip(-1), images[index])
        loss = F.cross_entropy(head(model(x)), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def knowing_teacher(tmp_path_factory) -> Path:
    """A ViT of width 64 and depth 3 trained with labels, as a plain backbone file."""
    config = tiny_config(Path("unused"), "model.embed_dim=64", "model.depth=3").model
    torch.manual_seed(0)
    teacher = build_backbone(config)
    supervised(teacher, labelled_scenes(16384, seed=7), steps=2000, batch=64)
    path = tmp_path_factory.mktemp("knowing_teacher") / "teacher.safetensors"
    save_backbone(teacher, path)
    return path


@pytest.mark.slow
def test_a_distilled_student_beats_scratch_and_resembles_its_teacher(tmp_path, knowing_teacher):
    students = {}
    for name, extra in [("scratch", []), ("distilled", [f"distill.teacher={knowing_teacher}"])]:
        run = tmp_path / name
        train(tiny_config(run, *STUDENT_RUN, *extra))
        students[name] = load_backbone(RunDir(run).export(".safetensors"))
    teacher = load_backbone(knowing_teacher)
    bank, queries = labelled_scenes(2048, seed=101), labelled_scenes(1024, seed=202)

    knn = {name: knn_top1(model, bank, queries) for name, model in students.items()}
    assert knn_top1(teacher, bank, queries) > 0.5  # the teacher knows the classes
    assert knn["distilled"] > knn["scratch"] + 0.02, knn

    teacher_features = cls_features(teacher, bank[0])
    cka = {
        name: linear_cka(cls_features(model, bank[0]), teacher_features)
        for name, model in students.items()
    }
    assert cka["distilled"] > 1.6 * cka["scratch"], cka
