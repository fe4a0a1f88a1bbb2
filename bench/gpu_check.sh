#!/usr/bin/env bash
# One CUDA GPU, PyPI-installed assets only (no hub), under 8 minutes: the speed paths on CUDA.
#   1. packing equivalence on CUDA: SmolLM2-135M, a packed batch (4D block mask under SDPA; varlen
#      position ids under flash-attention 2 when flash-attn is installed) against the same examples
#      unpacked, fp32 losses and gradients (and bf16 losses), and the chunked supervised-position
#      loss against the naive one;
#   2. bench/train_speed.py on CUDA in bf16: quickstart and chat, ftcli vs Trainer + peft (and TRL),
#      real tokens/s and peak torch.cuda.max_memory_allocated;
#   3. estimate-memory --measure on CUDA for LoRA and QLoRA (bf16 compute): estimate vs measured peak.
# Usage: bash bench/gpu_check.sh        (PY=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"

echo "== 1. packing and supervised-position loss on CUDA"
timeout 150 $PY - <<'EOF'
import random

import torch
from transformers import AutoModelForCausalLM

from ftcli.data.tokenize import IGNORE_INDEX, collate, pack
from ftcli.forward import loss_sums, supervised_cross_entropy, token_cross_entropy
from ftcli.models import load_tokenizer
from ftcli.recipe import load_recipe, resolve_recipe_path

r = load_recipe(resolve_recipe_path("smollm2-chat-lora"), [])
tok, _, model_dir = load_tokenizer(r.model)
rng = random.Random(0)
feats = []
for _ in range(8):
    k = rng.randrange(20, 120)
    ids = [rng.randrange(10, len(tok)) for _ in range(k)]
    cut = rng.randrange(1, k - 1)
    feats.append({"input_ids": ids, "attention_mask": [1] * k, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
impls = ["sdpa"]
try:
    import flash_attn  # noqa: F401
    impls.append("flash_attention_2")
except ImportError:
    print("flash-attn not installed: varlen path not checked")
for impl in impls:
    dtype = torch.bfloat16 if impl == "flash_attention_2" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=impl).cuda().eval()
    def run(batch):
        m.zero_grad(set_to_none=True)
        s, c = loss_sums(m, {k: v.cuda() for k, v in batch.items()}, "causal_lm")
        (s / c).backward()
        return (s / c).item(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    lu, gu = run(collate(feats, tok.pad_token_id))
    lp, gp = run(pack(feats, tok.pad_token_id, None, varlen=impl.startswith("flash")))
    gdiff = max((gu[n] - gp[n]).abs().max().item() for n in gu)
    print(f"{impl:18} {dtype}: loss unpacked {lu:.6f} packed {lp:.6f} |dloss| {abs(lu - lp):.2e} max|dgrad| {gdiff:.2e}")
    with torch.no_grad():
        b = {k: v.cuda() for k, v in collate(feats, tok.pad_token_id).items()}
        naive, mask = token_cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        fast, _ = supervised_cross_entropy(m, b)
    print(f"{impl:18} supervised-position chunked CE vs naive: max|diff| {(naive - fast)[mask].abs().max().item():.2e}")
EOF

echo "== 2. speed on CUDA (bf16): ftcli vs Trainer + peft / TRL"
BENCH_DEVICE=cuda timeout 300 $PY bench/train_speed.py --cases quickstart chat --steps 30 --rounds 1 \
  --sides ftcli trainer trainer-grouped trl

echo "== 3. estimate vs measured peak on CUDA (LoRA, QLoRA bf16)"
timeout 60 $PY -m ftcli estimate-memory smollm2-sentiment-lora --device cuda --measure
timeout 60 $PY -m ftcli estimate-memory smollm2-sentiment-qlora --device cuda --measure \
  --set method.quantization.compute_dtype=bfloat16
