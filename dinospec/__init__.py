"""dinospec: DINOv2-style self-supervised pretraining with [CLS]/patch layer specialization."""

__version__ = "0.1.0"
