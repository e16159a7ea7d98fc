from dinospec.models.tokens import TokenTypes
from dinospec.models.vit import DinoVisionTransformer, build_backbone

__all__ = ["DinoVisionTransformer", "TokenTypes", "build_backbone"]
