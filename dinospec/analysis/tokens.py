"""How [CLS], register and patch tokens relate around every LayerNorm of a backbone.

The paper's argument rests on two measurements: across a LayerNorm the cosine similarity
between [CLS] and patch tokens falls to about zero while patch-patch similarity stays
positive, and a few channels carry most of the [CLS] magnitude ("dimension separation").
Both are measured here on three values of every norm: its input, its normalized value
before the affine, and its output, so one can see whether the statistics or the affine do
the separating.

The model's norm hooks (`DinoVisionTransformer.register_norm_hook`) hand over whole
sequences however a specialized model carries its tokens, which makes the statistics of a
specialized model directly comparable with those of a vanilla one. Statistics are reduced
batch by batch inside the hooks: keeping every norm's activations of a ViT-L for 256
images would take tens of gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.models.sublayers import SpecializedLayerNorm
from dinospec.models.vit import DinoVisionTransformer

STAGES = ("input", "normalized", "output")
STAGE_TITLES = {
    "input": "norm input",
    "normalized": "normalized, before affine",
    "output": "norm output",
}
DEFAULT_RATIO_THRESHOLD = 10.0
_TINY = 1e-12


@dataclass(frozen=True)
class NormSite:
    """One normalization layer: `kind` is norm1, norm2 or final; the final norm sits at
    block index `depth`, after the last block."""

    name: str
    kind: str
    block: int
    module: nn.LayerNorm

    @property
    def specialized(self) -> bool:
        return isinstance(self.module, SpecializedLayerNorm)


@dataclass(frozen=True)
class NormTensors:
    """The three values of one norm call, each (B, N, D) in sequence order
    ([CLS], registers, patches)."""

    input: Tensor
    normalized: Tensor
    output: Tensor

    def stage(self, name: str) -> Tensor:
        return getattr(self, name)


@dataclass(frozen=True)
class TokenLayout:
    """Where each token type sits in a full sequence. Registers follow [CLS] whichever
    stream they ride in, so the reassembled order is the same for every specialization."""

    num_registers: int

    def cls(self, x: Tensor) -> Tensor:
        return x[:, :1]

    def registers(self, x: Tensor) -> Tensor:
        return x[:, 1 : 1 + self.num_registers]

    def patches(self, x: Tensor) -> Tensor:
        return x[:, 1 + self.num_registers :]


def norm_sites(model: DinoVisionTransformer) -> list[NormSite]:
    """Every normalization layer in forward order."""
    sites = []
    for i, block in enumerate(model.blocks):
        sites.append(NormSite(f"blocks.{i}.norm1", "norm1", i, block.norm1))
        sites.append(NormSite(f"blocks.{i}.norm2", "norm2", i, block.norm2))
    sites.append(NormSite("norm", "final", len(model.blocks), model.norm))
    return sites


def normalized_before_affine(module: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class NormRecorder:
    """Hooks on every norm of a backbone that hand `sink` the full-sequence input,
    normalized value and output of each norm, once per forward."""

    def __init__(
        self, model: DinoVisionTransformer, sink: Callable[[NormSite, NormTensors], None]
    ) -> None:
        self.model = model
        self.sites = norm_sites(model)
        self.sink = sink
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> NormRecorder:
        for site in self.sites:
            handle = self.model.register_norm_hook(site.name, self._hook_for(site))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, site: NormSite) -> Callable[[Tensor, Tensor], None]:
        def hook(x: Tensor, output: Tensor) -> None:
            x = x.detach()
            self.sink(
                site, NormTensors(x, normalized_before_affine(site.module, x), output.detach())
            )

        return hook


def cross_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity over every pair (token of a, token of b), per image: (B,).
    The mean of dot products of unit vectors is the dot product of their sums, so no
    (K x P) matrix is built."""
    ua = F.normalize(a.double(), dim=-1).sum(dim=1)
    ub = F.normalize(b.double(), dim=-1).sum(dim=1)
    return (ua * ub).sum(dim=-1) / (a.shape[1] * b.shape[1])


def pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over every pair of distinct tokens of x, per image: (B,).
    |sum u|^2 counts every ordered pair plus each token with itself; the self terms go."""
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"pairwise cosine needs at least 2 tokens, got {n}")
    u = F.normalize(x.double(), dim=-1)
    total = u.sum(dim=1).square().sum(dim=-1)
    return (total - u.square().sum(dim=(1, 2))) / (n * (n - 1))


def cosine_per_image(x: Tensor, layout: TokenLayout) -> dict[str, Tensor]:
    """Every token-pair similarity the analysis reports, each (B,)."""
    cls, patches = layout.cls(x), layout.patches(x)
    out = {"cls_patch": cross_cosine(cls, patches), "patch_patch": pairwise_cosine(patches)}
    if layout.num_registers:
        registers = layout.registers(x)
        out["cls_register"] = cross_cosine(cls, registers)
        out["register_patch"] = cross_cosine(registers, patches)
    if layout.num_registers > 1:
        out["register_register"] = pairwise_cosine(layout.registers(x))
    return out


def magnitude_sums(x: Tensor, layout: TokenLayout) -> dict[str, tuple[Tensor, int]]:
    """Per-channel sum of |x| and the number of tokens summed, per token type."""
    groups = {"cls": layout.cls(x), "patch": layout.patches(x)}
    if layout.num_registers:
        groups["register"] = layout.registers(x)
    return {
        name: (t.double().abs().sum(dim=(0, 1)), t.shape[0] * t.shape[1])
        for name, t in groups.items()
    }


def log10_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Per-channel log10(numerator / denominator): 1 means ten times larger."""
    return np.log10(numerator + _TINY) - np.log10(denominator + _TINY)


def separation(log_ratio: np.ndarray, threshold: float) -> dict[str, float]:
    """Share of channels where one token type's mean magnitude exceeds the other's by
    more than `threshold` times: the paper's "dimension separation"."""
    limit = np.log10(threshold)
    cls_share = float(np.mean(log_ratio > limit))
    patch_share = float(np.mean(log_ratio < -limit))
    return {
        "cls_dominant": cls_share,
        "patch_dominant": patch_share,
        "total": cls_share + patch_share,
    }


@dataclass
class StageStats:
    """Statistics of one value (input, normalized or output) of one norm over all images."""

    cosine: dict[str, np.ndarray]
    magnitude: dict[str, np.ndarray]
    threshold: float

    @property
    def log_ratio(self) -> np.ndarray:
        """log10 of [CLS] over patch mean magnitude, per channel."""
        return log10_ratio(self.magnitude["cls"], self.magnitude["patch"])

    @property
    def register_log_ratio(self) -> np.ndarray | None:
        if "register" not in self.magnitude:
            return None
        return log10_ratio(self.magnitude["register"], self.magnitude["patch"])

    @property
    def separation(self) -> dict[str, float]:
        return separation(self.log_ratio, self.threshold)

    def cosine_summary(self, key: str) -> dict[str, float]:
        values = self.cosine[key]
        return {"mean": float(values.mean()), "std": float(values.std())}

    def to_json(self) -> dict:
        out = {
            "cosine": {k: self.cosine_summary(k) for k in self.cosine},
            "magnitude": {k: _rounded(v) for k, v in self.magnitude.items()},
            "log10_ratio_cls_patch": _rounded(self.log_ratio),
            "separation": self.separation,
        }
        if self.register_log_ratio is not None:
            out["log10_ratio_register_patch"] = _rounded(self.register_log_ratio)
        return out


def _rounded(values: np.ndarray) -> list[float]:
    """Six significant digits: enough for any plot, and a ViT-L's file stays small."""
    return [float(f"{v:.6g}") for v in values.tolist()]


@dataclass
class StageAccumulator:
    """Running per-image cosines and per-channel magnitude sums of one (norm, stage)."""

    cosines: dict[str, list[Tensor]] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, x: Tensor, layout: TokenLayout) -> None:
        for key, values in cosine_per_image(x, layout).items():
            self.cosines.setdefault(key, []).append(values.cpu())
        for key, (total, count) in magnitude_sums(x, layout).items():
            self.sums[key] = self.sums.get(key, 0) + total.cpu()
            self.counts[key] = self.counts.get(key, 0) + count

    def finish(self, threshold: float) -> StageStats:
        return StageStats(
            cosine={k: torch.cat(v).numpy() for k, v in self.cosines.items()},
            magnitude={k: (self.sums[k] / self.counts[k]).numpy() for k in self.sums},
            threshold=threshold,
        )


@dataclass
class NormStats:
    name: str
    kind: str
    block: int
    specialized: bool
    stages: dict[str, StageStats]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "block": self.block,
            "specialized": self.specialized,
            "stages": {s: self.stages[s].to_json() for s in STAGES},
        }


@dataclass
class BackboneAnalysis:
    """Everything `analyze` measures on one backbone. `heatmap` holds |x| of the first
    image, (tokens, channels) per stage, at the norm named `heatmap_site`."""

    model: dict
    num_images: int
    image_size: tuple[int, int]
    threshold: float
    norms: list[NormStats]
    heatmap_site: str
    heatmap: dict[str, np.ndarray]

    def norm(self, name: str) -> NormStats:
        for stats in self.norms:
            if stats.name == name:
                return stats
        raise KeyError(f"no norm named {name!r}; have {[n.name for n in self.norms]}")

    def of_kind(self, kind: str) -> list[NormStats]:
        return [n for n in self.norms if n.kind == kind]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "num_images": self.num_images,
            "image_size": list(self.image_size),
            "ratio_threshold": self.threshold,
            "heatmap_site": self.heatmap_site,
            "norms": [n.to_json() for n in self.norms],
        }


def model_summary(model: DinoVisionTransformer) -> dict:
    c = model.config
    return {
        "embed_dim": c.embed_dim,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "patch_size": c.patch_size,
        "num_register_tokens": c.num_register_tokens,
        "specialized": model.is_specialized,
        "prefix_tokens": model.plan.tokens,
        "prefix_stream_length": model.plan.num_prefix_path_tokens(model.num_register_tokens),
        "specialized_norms": [s.name for s in norm_sites(model) if s.specialized],
    }


@torch.inference_mode()
def analyze_backbone(
    model: DinoVisionTransformer,
    batches: Iterable[Tensor],
    threshold: float = DEFAULT_RATIO_THRESHOLD,
    heatmap_site: str | None = None,
) -> BackboneAnalysis:
    """Token statistics of every norm of a frozen backbone over all images in `batches`
    (normalized (B, 3, H, W) tensors on the model's device). The heat-map defaults to the
    last block's norm1, where the paper sees the strongest separation. The model is left
    in eval mode: analysis is of the frozen function, without stochastic depth."""
    model.eval()
    layout = TokenLayout(model.num_register_tokens)
    heatmap_site = heatmap_site or f"blocks.{len(model.blocks) - 1}.norm1"
    accumulators = {
        (s.name, stage): StageAccumulator() for s in norm_sites(model) for stage in STAGES
    }
    heatmap: dict[str, np.ndarray] = {}

    def sink(site: NormSite, tensors: NormTensors) -> None:
        for stage in STAGES:
            x = tensors.stage(stage)
            accumulators[site.name, stage].add(x, layout)
            if site.name == heatmap_site and stage not in heatmap:
                heatmap[stage] = x[0].abs().float().cpu().numpy()

    num_images, image_size = 0, (0, 0)
    with NormRecorder(model, sink) as recorder:
        if heatmap_site not in {s.name for s in recorder.sites}:
            raise ValueError(f"heat-map norm {heatmap_site!r} is not a norm of this model")
        for images in batches:
            model.forward_features(images)
            num_images += images.shape[0]
            image_size = tuple(images.shape[-2:])
    if not num_images:
        raise ValueError("no images to analyze")
    norms = [
        NormStats(
            site.name,
            site.kind,
            site.block,
            site.specialized,
            {stage: accumulators[site.name, stage].finish(threshold) for stage in STAGES},
        )
        for site in norm_sites(model)
    ]
    return BackboneAnalysis(
        model_summary(model), num_images, image_size, threshold, norms, heatmap_site, heatmap
    )
