"""GGUF export figures per quant type on a chat run: the export check (log-prob differences, greedy
agreement, tokenization, template), file sizes, and generation speed on the CPU, llama.cpp vs
transformers (merged/ in float32), same prompt, same thread count, greedy, a fixed token count.

    python bench/export_check.py                                  # trains smollm2-chat-lora first
    python bench/export_check.py --run runs/smollm2-chat-lora     # an existing run (merged/ in it)
    python bench/export_check.py --quants f16 q8_0 --tokens 64 --repeats 3

Without --run it trains the bundled smollm2-chat-lora recipe for --train-steps optimizer steps
(LoRA on SmolLM2-135M-Instruct, chatterbot conversations; merged by the run) into --runs. Speed
repeats are interleaved (the order alternates) and medians reported, so load from other jobs hits
every variant alike. Prints a markdown table and writes the figures as JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ftcli import ftcli  # noqa: E402


def _prompt_ids(run: Path, tok) -> list[int]:
    """The first test conversation's prompt, as the model sees it before answering."""
    from ftcli.data.tokenize import prompt_and_target
    from ftcli.rundir import open_run

    prompt, _ = prompt_and_target(tok, open_run(run).examples[0])
    return tok(prompt, add_special_tokens=False)["input_ids"]


def speed(run: Path, files: dict[str, Path], tokens: int, repeats: int) -> dict[str, float]:
    """Greedy tokens/s (prompt included in the time, as a user waits for it): transformers on
    merged/ in float32, and llama.cpp on each file, with the same thread count."""
    import llama_cpp
    import numpy as np
    import torch

    from ftcli.models import load_folder, tokenizer_from

    folder = run / "merged"
    tok = tokenizer_from(folder)
    model = load_folder(folder, "causal_lm", "float32")
    ids = _prompt_ids(run, tok)
    threads = torch.get_num_threads()

    def hf():
        with torch.no_grad():
            model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    variants = {"transformers (float32)": hf}
    for quant, path in files.items():
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=len(ids) + tokens + 8, n_threads=threads, verbose=False
        )

        def run_llama(llm=llm):
            llm.reset()
            llm.eval(ids)
            for _ in range(tokens):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

        variants[f"llama.cpp {quant}"] = run_llama
    names = list(variants)
    for n in names:  # warm-up
        variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: tokens / statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run folder with merged/ (default: train one)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where to train (no --run)")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()

    run = a.run
    if run is None:
        info = ftcli(
            "train",
            "smollm2-chat-lora",
            "--set",
            f"output_dir={a.runs}",
            "--set",
            f"train.max_steps={a.train_steps}",
            "--set",
            "eval.generate_examples=8",
            "--force",
        )
        run = Path(info.get("run_dir") or a.runs / "smollm2-chat-lora")
    if not (run / "merged").is_dir():
        ftcli("merge", str(run), str(run / "merged"))
    rows, files = [], {}
    for q in a.quants:
        r = ftcli("export", str(run), "--quant", q, "--force")
        files[q] = Path(r["path"])
        rows.append(r)
    tps = speed(run, files, a.tokens, a.repeats)
    merged_bytes = sum(f.stat().st_size for f in (run / "merged").glob("*.safetensors"))

    print(f"\nrun: {run}  (merged/ float32 safetensors: {merged_bytes / 2**20:.1f} MiB)")
    print(
        "\n| quant | file | log-prob diff max / mean (tolerance) | top-1 agreement "
        "| greedy agreement | tokenization | template | llama.cpp tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lp, g = r["logprob_check"], r["greedy_check"]
        print(
            f"| {r['quant']} | {r['bytes'] / 2**20:.1f} MiB "
            f"| {lp['max_abs_diff']:.3f} / {lp['mean_abs_diff']:.4f} "
            f"({lp['tolerance_max']:g} / {lp['tolerance_mean']:g}) over {lp['positions']} "
            f"| {lp['top1_agreement']:.1%} "
            f"| {g['agreement']:.1%} ({g['identical']}/{g['prompts']} identical, "
            f"{g['near_ties']} near-ties) "
            f"| {'identical' if r['tokenizer_check']['passed'] else 'differs'} "
            f"| {'identical' if r['template_check']['passed'] else 'differs'} "
            f"| {tps['llama.cpp ' + r['quant']]:.1f} |"
        )
    print(f"\ntransformers (merged/, float32): {tps['transformers (float32)']:.1f} tok/s")
    print(f"greedy, {a.tokens} tokens after the first test prompt, median of {a.repeats}")
    if a.json_out:
        a.json_out.write_text(
            json.dumps({"run": str(run), "exports": rows, "tokens_per_s": tps}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
