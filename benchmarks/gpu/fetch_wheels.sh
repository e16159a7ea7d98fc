#!/usr/bin/env bash
# Run here (a machine with PyPI) before a device check: puts into .whl/ the wheels the lent
# H200 lacks (its image has torch, torchvision, timm, safetensors, matplotlib, tqdm, pyyaml;
# not omegaconf, submitit, fvcore). fvcore, iopath and antlr4 4.9.3 (omegaconf pins it)
# ship only as sdists, so they are built into wheels here. .whl/ is git-ignored; name it
# in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
    omegaconf==2.3.0 submitit yacs termcolor
python3 -m pip wheel --quiet --no-deps -w .whl fvcore iopath antlr4-python3-runtime==4.9.3
ls .whl
