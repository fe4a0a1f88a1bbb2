#!/usr/bin/env bash
# What the CPU tests cannot cover, on a lent CUDA machine: FSDP2 through accelerate (LoRA, full,
# QLoRA + bnb_4bit_quant_storage), checkpoints and --resume under FSDP2, DeepSpeed ZeRO-2/3 (when
# deepspeed is installed), DDP over NCCL (2+ GPUs). Tiny model built on the spot: no hub needed.
#   bash bench/gpu_distributed.sh            (about 2-4 minutes on one GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no nvidia-smi"; exit 0; }
exec timeout 540 "$PY" bench/gpu_distributed.py "$@"
