"""The streamed run's memory over the run: is it flat?

    python bench/stream_memory.py --examples 1000000     # the issue's figure (minutes; not on a shared box)
    python bench/stream_memory.py --examples 20000       # a check that it works

Generates a chat jsonl of N conversations (1-3 user/assistant turns of review text from the
bundled sentiment benchmark), then streams it once through ftcli's streamed batch generator
(``ftcli.data.stream.StreamedBatches``: read, cleaned, hash-split, tokenized in batches with the
SmolLM2 tokenizer of the bundled recipe smollm2-chat-lora, shuffle buffer, length grouping,
packed micro-batches handed on as feature lists), as a training run would, without a model.
Resident memory (RSS) is sampled every few seconds; the table gives it at 0%, 25%, 50%, 75% and
100% of the stream's training examples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20


def rss() -> int:
    """This process's resident memory in bytes (/proc; psutil where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    """``n`` distinct chat conversations of 1-3 turns built from the bundled review sentences."""
    from ftcli.bundled import __file__ as bundled

    src = Path(bundled).parent / "benchmarks" / "rt_sentiment.jsonl"
    texts = [json.loads(x).get("text", "") for x in src.read_text().splitlines() if x.strip()]
    texts = [t for t in texts if t] or ["a quiet film about nothing much"]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = []
            for _ in range(rng.randint(1, 3)):
                msgs.append(
                    {"role": "user", "content": f"what do you think of this? {rng.choice(texts)}"}
                )
                msgs.append({"role": "assistant", "content": rng.choice(texts)})
            msgs[0]["content"] += f" (#{i})"
            f.write(json.dumps({"messages": msgs}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--shuffle-buffer", type=int, default=10_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the corpus here (kept)")
    args = ap.parse_args()

    from ftcli.data.stream import StreamedBatches, scan
    from ftcli.models import load_tokenizer
    from ftcli.recipe import load_recipe
    from ftcli.recipe.load import bundled_recipes_dir

    tmp = tempfile.TemporaryDirectory(prefix="ftcli-stream-bench-")
    corpus = args.keep or Path(tmp.name) / "chat.jsonl"
    t0 = time.perf_counter()
    write_corpus(corpus, args.examples)
    print(
        f"corpus: {args.examples:,} conversations, {corpus.stat().st_size / MiB:,.0f} MiB "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    recipe = load_recipe(
        bundled_recipes_dir() / "smollm2-chat-lora.yaml",
        [
            f"data.path={corpus}",
            "data.streaming=true",
            f"data.shuffle_buffer={args.shuffle_buffer}",
            "data.max_length=1024",
            "train.max_steps=1000000",
        ],
    )
    tokenizer, _, _ = load_tokenizer(recipe.model)
    base = rss()
    s = scan(recipe)
    stream = StreamedBatches(recipe, tokenizer, None, s.held, recipe.data.packs(recipe.task))
    expected = args.examples * (1 - recipe.data.split.test - recipe.data.split.validation)
    samples: list[tuple[float, int, int]] = []  # (seconds, examples, rss)
    seen = 0
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(args.every):
            samples.append((time.perf_counter() - t1, seen, rss()))

    t1 = time.perf_counter()
    samples.append((0.0, 0, rss()))
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    marks = {0: samples[0][2]}
    for batch in stream.micro_batches():
        if stream.passes > 1:
            break
        seen += len(batch)
        for q in (25, 50, 75):
            if q not in marks and seen >= expected * q / 100:
                marks[q] = rss()
    done.set()
    thread.join()
    marks[100] = rss()
    wall = time.perf_counter() - t1
    print(
        f"streamed {seen:,} training examples in {wall:.0f} s ({seen / wall:,.0f}/s); "
        f"RSS before the stream {base / MiB:,.0f} MiB"
    )
    print("| progress | RSS MiB |")
    print("|---:|---:|")
    for q in (0, 25, 50, 75, 100):
        print(f"| {q}% | {marks.get(q, 0) / MiB:,.0f} |")
    peak = max(r for _, _, r in samples + [(0, 0, marks[100])])
    print(f"peak of {len(samples)} samples every {args.every:g} s: {peak / MiB:,.0f} MiB")
    tmp.cleanup()


if __name__ == "__main__":
    main()
