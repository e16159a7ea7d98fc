#!/usr/bin/env bash
# Run on the lent H200 (device tool, `carry: [".whl", ".bench_data"]`, timeout_s 600),
# after benchmarks/gpu/prepare.sh here. Installs the carried wheels and the project, then
# runs issue 7's GPU checks and measurements one after the other; each table lands in
# $OUT/*.txt.
#   bash benchmarks/gpu/run.sh [train_step models, default l,s,b]
# The parts run in order of importance, each under its own time limit, and write their
# tables as they go, so if the call's time runs out only the least important are lost:
# the CUDA checks, then ViT-L (the 40% MFU target; it compiles longest), bf16 before fp32.
set -uo pipefail
MODELS=${1:-l,s,b}
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/host cores /' | tee -a "$OUT/gpu.txt"
# First the numbers: flash attention, bf16, compiled and FSDP2 (NCCL) steps on CUDA kernels.
timeout 150 python3 benchmarks/gpu/checks.py 2>&1 | tee "$OUT/checks.txt"
# One model per process and per time limit, so compilation of a large model cannot take
# the smaller models' tables with it; each step's time is printed as it is measured, and
# the 25 costliest operators of one step per variant say where the time goes. Dense bf16
# peak of an H200 SXM: 989 TFLOP/s (NVIDIA's datasheet, without sparsity).
# Each size runs four twins, vanilla and specialized, each with the student's crop sizes one
# after the other (per_crop, the default) and packed into one sequence (one_pass: shared
# GEMMs once for all crops, attention one SDPA call per crop size); the one/per column is
# the step-time ratio of the two.
for model in ${MODELS//,/ }; do
    limit=180
    [ "$model" = l ] && limit=300
    timeout $limit python3 benchmarks/train_step.py --models "$model" --rounds 5 \
        --peak-tflops 989 --profile 25 --multi-crop-attention per_crop,one_pass 2>&1 \
        | tee "$OUT/train_step_$model.txt"
done
# DINOv2's own one-pass kernel: xformers' memory_efficient_attention with a block-diagonal
# mask over every image (one launch for all crops), ViT-L, where xformers imports (carried
# by prepare.sh); first which operator it dispatches to.
if python3 -c "import xformers.ops" 2>/dev/null; then
    timeout 60 python3 -c "
import torch
from xformers.ops import fmha
q = torch.randn(1, 64, 6, 64, device='cuda', dtype=torch.bfloat16)
mask = fmha.BlockDiagonalMask.from_seqlens([40, 24])
op = fmha._dispatch_fw(fmha.Inputs(q, q, q, attn_bias=mask), False)
print('xformers', __import__('xformers').__version__, 'forward operator', op.NAME)
" 2>&1 | tee "$OUT/train_step_l_xformers.txt"
    timeout 300 python3 benchmarks/train_step.py --models l --rounds 5 --peak-tflops 989 \
        --attn-backend xformers --multi-crop-attention per_crop,one_pass 2>&1 \
        | tee -a "$OUT/train_step_l_xformers.txt"
fi
# The peer: DINOv2's own training step (carried by prepare.sh) against dinospec's, vanilla
# and specialized, bf16; its agreement checks run first. Not yet run on a GPU.
timeout 150 python3 benchmarks/vs_dinov2.py --device cuda --dtype bf16 --configs full \
    --batch-sizes 32 --rounds 5 --reference .bench_data/dinov2_reference 2>&1 \
    | tee "$OUT/vs_dinov2_bf16.txt"
# The same with dinospec's student in one pass (its agreement with DINOv2 checked first).
timeout 150 python3 benchmarks/vs_dinov2.py --device cuda --dtype bf16 --configs full \
    --batch-sizes 32 --rounds 5 --reference .bench_data/dinov2_reference \
    --multi-crop-attention one_pass 2>&1 | tee "$OUT/vs_dinov2_bf16_one_pass.txt"
timeout 60 python3 benchmarks/backbone_vs_reference.py --device cuda --dtype bf16 \
    --batch 64 --rounds 9 2>&1 | tee "$OUT/backbone_vs_timm_bf16.txt"
# The training loader on the host's cores (14 workers; the trainer and the pin thread keep
# two), to set beside the steps' images/s above: does the GPU wait for data?
timeout 60 python3 benchmarks/data_pipeline.py --data .bench_data/imagenette --images 200 \
    --rounds 1 --workers 14 --batch 64 --loader-images 4096 2>&1 \
    | tee "$OUT/data_pipeline_14_workers.txt"
timeout 60 python3 benchmarks/backbone_vs_reference.py --device cuda --dtype fp32 \
    --batch 64 --rounds 9 2>&1 | tee "$OUT/backbone_vs_timm_fp32.txt"
# Kernels per step of the compiled blocks on CUDA, specialized against vanilla.
timeout 60 python3 benchmarks/specialize_overhead.py --device cuda --compile --batch 64 \
    --rounds 5 2>&1 | tee "$OUT/specialize_overhead_cuda.txt"
# DINOv3-era features (issue #24): a step with Gram anchoring (1x, 2x Gram teacher) and with
# distillation from a 2x-wide frozen teacher, against the plain step, ViT-S/14 at 224 px.
timeout 120 python3 benchmarks/dinov3_features.py --device cuda --size s --patch 14 --crop 224 \
    --batch 32 --local-crops 8 --prototypes 65536 --rounds 5 2>&1 \
    | tee "$OUT/dinov3_features.txt"
