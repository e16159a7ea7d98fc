"""DINOv2's linear depth probe on a frozen backbone ("lin. 1" and "lin. 4" of its paper).

Features: for each chosen block, its patch tokens with the block's [CLS] token appended to
every one (2 x embed_dim channels), the blocks concatenated on channels; taken without the
final LayerNorm (`final_norm=False` in DINOv2's depth configs, `norm=False` in its hub
depthers). lin. 1 reads the last block. lin. 4 reads four blocks spread over the depth:
those of DINOv2's configs for depths 12, 24 and 40 (ViT-S/B, ViT-L, ViT-g), and the last
block of each quarter for other depths.

Head: DINOv2's `BNHead` as its depth configs build it: a 1x1 conv to 256 bins whose centres
are spaced uniformly over [min_depth, max_depth] (0.001 to 10 m on NYU), logits at 4x the
token resolution turned into bin weights by the "linear" normalisation of AdaBins
(relu(logit) + 0.1, divided by the sum), and depth the weighted sum of the bin centres.
Despite its name the head has no BatchNorm (it is commented out in DINOv2's code). As a
convex combination of bin centres, every prediction lies within the depth range, so
DINOv2's clamp of test predictions to that range has nothing to do here.

Two differences of form, not of function: DINOv2 upsamples the features by 4 and then
applies the conv; the conv comes first here and its logits are upsampled, which is the
same map (1x1 conv and bilinear interpolation are linear, and interpolation weights sum
to 1 so the bias passes unchanged) with 16x fewer multiply-adds in the conv. Images are
zero-padded on both sides to a multiple of the patch size (DINOv2's `CenterPadding`), but
the padded depth map is then cropped back to the image, where DINOv2 resizes the whole
padded map to the image size and so shifts it by up to half a patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eval.seg_head import FrozenBackbone, center_pad

UPSAMPLE = 4
LINEAR_NORM_EPS = 0.1
DINOV2_LIN4_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
"""0-based blocks of DINOv2's lin. 4 and DPT depth heads, by backbone depth."""


def probe_blocks(depth: int, n_layers: int) -> list[int]:
    """Blocks whose outputs feed the probe: the last one, or `n_layers` spread over depth."""
    if n_layers == 1:
        return [depth - 1]
    if n_layers == 4 and depth in DINOV2_LIN4_BLOCKS:
        return list(DINOV2_LIN4_BLOCKS[depth])
    return [depth * (k + 1) // n_layers - 1 for k in range(n_layers)]


class FrozenDepthFeatures(FrozenBackbone):
    """[patch tokens, [CLS]] of the probed blocks, concatenated on channels (B, C, h, w)."""

    def __init__(self, backbone: nn.Module, n_layers: int = 1) -> None:
        super().__init__(backbone)
        self.blocks = probe_blocks(len(backbone.blocks), n_layers)
        self.out_dim = 2 * int(backbone.embed_dim) * n_layers

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layers = self.backbone.get_intermediate_layers(
            images, self.blocks, reshape=True, return_class_token=True, norm=False
        )
        maps = [torch.cat([p, c[:, :, None, None].expand_as(p)], dim=1) for p, c in layers]
        return torch.cat(maps, dim=1)


class LinearDepthHead(nn.Module):
    """1x1 conv to depth-bin logits; returns depth (B, 1, 4h, 4w) in metres."""

    def __init__(
        self, in_dim: int, n_bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        size = [UPSAMPLE * s for s in features.shape[-2:]]
        logits = F.interpolate(self.conv(features), size=size, mode="bilinear")
        weights = torch.relu(logits) + LINEAR_NORM_EPS
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.bins)[:, None]


class LinearDepther(nn.Module):
    """Frozen features + linear depth head: depth (B, H, W) in metres at the input size;
    only `head` has trainable parameters."""

    def __init__(
        self,
        backbone: nn.Module,
        n_layers: int = 1,
        n_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
    ) -> None:
        super().__init__()
        self.features = FrozenDepthFeatures(backbone, n_layers)
        self.head = LinearDepthHead(self.features.out_dim, n_bins, min_depth, max_depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded, (top, left) = center_pad(images, self.features.patch_size)
        depth = self.head(self.features(padded))
        depth = F.interpolate(depth, size=padded.shape[-2:], mode="bilinear")
        return depth[:, 0, top : top + height, left : left + width]


@torch.no_grad()
def predict_depth(depther: LinearDepther, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Test-time depth (B, H, W); with `flip`, the mean with the prediction of the mirrored
    images mirrored back, as DINOv2's NYU test pipeline does."""
    depth = depther(images)
    if flip:
        depth = (depth + depther(images.flip(-1)).flip(-1)) / 2
    return depth
