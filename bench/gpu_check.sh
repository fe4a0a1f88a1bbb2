#!/usr/bin/env bash
# Kept for old notes and habits: the CUDA checks that were here (packing equivalence, speed vs
# Trainer, estimate vs measured memory) are stages 1, 5 and 6 of bench/gpu_smoke.sh, with
# assertions, per-stage timeouts and smoke.json. Same arguments as gpu_smoke.sh.
exec bash "$(dirname "$0")/gpu_smoke.sh" "$@"
