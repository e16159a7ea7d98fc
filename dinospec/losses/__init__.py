"""DINOv2's self-supervised losses: DINO on [CLS], iBOT on masked patches, KoLeo."""

from dinospec.losses.dino import DINOLoss
from dinospec.losses.ibot import IBOTPatchLoss
from dinospec.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss"]
