from dinospec.models.vit import DinoVisionTransformer, build_backbone

__all__ = ["DinoVisionTransformer", "build_backbone"]
