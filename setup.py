from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dinospec",
    version="0.1.0",
    description="DINOv2-style self-supervised pretraining with [CLS]/patch layer specialization",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["dinospec", "dinospec.*", "eval", "eval.*", "launch", "launch.*"]
    ),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "omegaconf>=2.3",
        "submitit>=1.5",
        "fvcore>=0.1.5.post20221221",
        "numpy",
        "pillow",
        "safetensors>=0.4",
        "pyyaml",
        "matplotlib>=3.7",
        "tqdm",
    ],
    extras_require={
        "xformers": ["xformers"],
        "tb": ["tensorboard>=2.10"],
        "dev": [
            "tensorboard>=2.10",
            "pytest>=8",
            "ruff>=0.6",
            "torchmetrics>=1.0",
            "timm>=1.0",
            "transformers>=4.48",
        ],
    },
    entry_points={
        "console_scripts": ["dinospec = dinospec.cli:main"],
        "dinospec.commands": ["eval = eval.cli:register", "sweep = launch.sweep.cli:register"],
        "dinospec.evaluators": [
            "knn = eval.during_training:knn_evaluator",
            "seg = eval.during_training:seg_evaluator",
        ],
    },
)
