"""Token statistics, PCA pictures and training curves of frozen backbones (issue #5).

Figures live in `dinospec.analysis.plots`, which is not imported here so that computing
statistics does not load matplotlib.
"""

from dinospec.analysis.pca import PCAMaps, patch_features, pca_rgb
from dinospec.analysis.tokens import (
    STAGES,
    BackboneAnalysis,
    NormRecorder,
    NormSite,
    NormTensors,
    TokenLayout,
    analyze_backbone,
    norm_sites,
)

__all__ = [
    "STAGES",
    "BackboneAnalysis",
    "NormRecorder",
    "NormSite",
    "NormTensors",
    "PCAMaps",
    "TokenLayout",
    "analyze_backbone",
    "norm_sites",
    "patch_features",
    "pca_rgb",
]
