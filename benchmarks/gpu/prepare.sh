#!/usr/bin/env bash
# Run here (a machine with PyPI and ../shared) before a device check. Puts into .whl/ the
# wheels the lent H200 lacks (its image has torch, torchvision, timm, safetensors,
# matplotlib, tqdm, pyyaml; not omegaconf, submitit, fvcore, xformers): fvcore, iopath and antlr4
# 4.9.3 (omegaconf pins it) ship only as sdists, so they are built into wheels here. Puts
# into .bench_data/ 128 Imagenette train JPEGs per class (about 16 MB), so that the
# training loader can be timed with the device host's 16 cores, and DINOv2's reference code
# for the peer benchmark (vs_dinov2.py). Both folders are git-ignored; name them in the
# device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
    omegaconf==2.3.0 submitit yacs termcolor
python3 -m pip wheel --quiet --no-deps -w .whl fvcore iopath antlr4-python3-runtime==4.9.3
# xformers for the one-pass rows' block-diagonal kernel (model.multi_crop_attention=one_pass
# with model.attn_backend=xformers). Its wheel is built for one torch (0.0.35: 2.10); on
# another its C++ extension does not load, and its attention then runs on PyTorch's own
# flash kernel (xformers.ops.fmha.flash, varlen through cu_seqlens), which is what the rows
# measure; run.sh says which operator xformers picked.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
ls .whl
SOURCE=${SHARED:-../shared}/data/imagenette/train
rm -rf .bench_data && mkdir -p .bench_data/imagenette/train
for class_dir in "$SOURCE"/*/; do
    target=.bench_data/imagenette/train/$(basename "$class_dir")
    mkdir "$target"
    mapfile -t images < <(find "$class_dir" -maxdepth 1 -name '*.JPEG' | sort)
    cp -t "$target" "${images[@]:0:128}"
done
cp -r "${SHARED:-../shared}/reference/dinov2" .bench_data/dinov2_reference
du -sh .bench_data
