"""Gaussian blur probabilities per crop: DINOv2's executed values by default, configurable.

DINOv2's GaussianBlur(p) hands 1 - p to torchvision's RandomApply, so its code blurs global
crop 1 with probability 0.0, global crop 2 with 0.9 and local crops with 0.5, though it
states 1.0 / 0.1 / 0.5. The defaults are read from the reference's DataAugmentationDINO
(../shared/reference/dinov2); the rates are measured by counting the blur kernel's calls.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import dinov2
from torchvision.transforms import v2

from dinospec.config import ConfigError, CropsConfig, load_config
from dinospec.data import MultiCropAugmentation
from dinospec.data.transforms import BLUR_PROBABILITIES_STATED, FastGaussianBlur

DRAWS = 1000
N_LOCAL = 2
CROPS = ("global1", "global2", "local")


def blur_of(pipeline: v2.Transform, p: float = 1.0) -> list[tuple[FastGaussianBlur, float]]:
    """The blur of a pipeline and the probability its RandomApply gives it."""
    if isinstance(pipeline, v2.RandomApply):
        return [b for t in pipeline.transforms for b in blur_of(t, p * pipeline.p)]
    if isinstance(pipeline, v2.Compose):
        return [b for t in pipeline.transforms for b in blur_of(t, p)]
    return [(pipeline, p)] if isinstance(pipeline, FastGaussianBlur) else []


def pipelines(aug: MultiCropAugmentation) -> dict[str, v2.Transform]:
    transforms = (aug.global_transform_1, aug.global_transform_2, aug.local_transform)
    return dict(zip(CROPS, transforms, strict=True))


def reference_blur_probabilities() -> tuple[float, float, float]:
    """The RandomApply probability of each blur of DINOv2's own augmentation."""
    ref = dinov2("dinov2.data.augmentations").DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8)
    global1 = ref.global_transfo1.transforms[1]
    global2 = ref.global_transfo2.transforms[1].transforms[0]
    local = ref.local_transfo.transforms[1]
    return global1.p, global2.p, local.p


def test_defaults_are_what_dinov2_executes():
    executed = reference_blur_probabilities()
    assert executed == pytest.approx((0.0, 0.9, 0.5))
    crops = load_config(None).crops
    assert (crops.blur_prob_global1, crops.blur_prob_global2, crops.blur_prob_local) == (
        pytest.approx(executed)
    )
    default = CropsConfig()
    assert (default.blur_prob_global1, default.blur_prob_global2, default.blur_prob_local) == (
        pytest.approx(executed)
    )
    aug = MultiCropAugmentation()
    probabilities = [blur_of(pipeline)[0][1] for pipeline in pipelines(aug).values()]
    assert probabilities == pytest.approx(executed)


def measured_rates(aug: MultiCropAugmentation, monkeypatch) -> dict[str, float]:
    """Fraction of crops of each kind whose blur kernel ran, over DRAWS images."""
    owner = {id(blur_of(p)[0][0]): crop for crop, p in pipelines(aug).items()}
    calls: Counter[str] = Counter()
    original = FastGaussianBlur.transform

    def counting(self, inpt, params):
        calls[owner[id(self)]] += 1
        return original(self, inpt, params)

    monkeypatch.setattr(FastGaussianBlur, "transform", counting)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        aug(image)
    trials = {"global1": DRAWS, "global2": DRAWS, "local": DRAWS * N_LOCAL}
    return {crop: calls[crop] / trials[crop] for crop in CROPS}


@pytest.fixture
def one_thread():
    """Crops this small gain nothing from intra-op threads on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("probabilities", [None, BLUR_PROBABILITIES_STATED], ids=str)
def test_blur_rates_follow_the_probabilities(probabilities, monkeypatch, one_thread):
    """Within 5 binomial standard errors (exactly, for 0 and 1) of the set probabilities;
    None is the default, DINOv2's executed 0.0 / 0.9 / 0.5."""
    options = {} if probabilities is None else {"blur_probabilities": probabilities}
    aug = MultiCropAugmentation(
        local_crops_number=N_LOCAL, global_crops_size=16, local_crops_size=12, **options
    )
    expected = dict(zip(CROPS, probabilities or reference_blur_probabilities(), strict=True))
    rates = measured_rates(aug, monkeypatch)
    for crop, p in expected.items():
        trials = DRAWS * (N_LOCAL if crop == "local" else 1)
        assert abs(rates[crop] - p) <= 5 * math.sqrt(p * (1 - p) / trials), (crop, rates)


@pytest.mark.parametrize("key", ["blur_prob_global1", "blur_prob_global2", "blur_prob_local"])
def test_blur_probabilities_are_checked_at_load(key):
    assert getattr(load_config(None, [f"crops.{key}=1.0"]).crops, key) == 1.0
    with pytest.raises(ConfigError, match=rf"crops\.{key}=1\.5"):
        load_config(None, [f"crops.{key}=1.5"])
