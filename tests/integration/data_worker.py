"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by test_prepare_cmd.py; not a test itself.

Each rank loads its data through ``store.load_data`` as the pipeline's prepare stage does,
counting what it calls that prepares (``write_data``) or tokenizes (any tokenizer call), and
measuring its resident memory (VmRSS) before and after. Each rank writes its figures as JSON to
``OUT-rank<N>.json``.
"""

from __future__ import annotations

import gc
import json
import sys


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident memory: all of it (VmRSS), or its anonymous part (RssAnon: what the process
    allocated, not pages of mapped files, which every process mapping them shares)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(recipe_path: str, out: str) -> None:
    from transformers import PreTrainedTokenizerBase

    import ftcli.data.prepared as prepared_mod
    from ftcli.data import store
    from ftcli.models import load_tokenizer
    from ftcli.pipeline import make_accelerator
    from ftcli.recipe import load_recipe
    from ftcli.ui import UI

    recipe = load_recipe(recipe_path)
    acc, _ = make_accelerator(recipe)
    counts = {"write_data": 0, "tokenizer_calls": 0}
    real_write = prepared_mod.write_data

    def counting_write(*a, **k):
        counts["write_data"] += 1
        return real_write(*a, **k)

    prepared_mod.write_data = counting_write
    tok, _, model_dir = load_tokenizer(recipe.model)
    for name in ("__call__", "encode", "apply_chat_template", "batch_encode_plus"):
        real = getattr(PreTrainedTokenizerBase, name, None)
        if real is None:
            continue

        def counted(self, *a, _real=real, **k):
            counts["tokenizer_calls"] += 1
            return _real(self, *a, **k)

        setattr(PreTrainedTokenizerBase, name, counted)
    # imported before the first reading, on both ranks alike: the modules are not the data
    import datasets  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.ipc  # noqa: F401

    # the process group's first collective sets up its buffers: done before measuring, on
    # both ranks alike (load_data's own collective then reuses them)
    import torch.distributed as dist

    import ftcli.data.lengths  # noqa: F401
    import ftcli.data.prepared  # noqa: F401
    import ftcli.data.rows  # noqa: F401

    if dist.is_initialized():
        dist.all_gather_object([None] * acc.num_processes, {"warm": True})
    gc.collect()
    before, anon_before = rss_bytes(), rss_bytes("RssAnon")
    prepared, tokenized, note = store.load_data(recipe, tok, model_dir, acc, UI())
    n = {s: len(t.features) for s, t in tokenized.items()}
    first = list(tokenized["train"].features[0]["input_ids"])
    last = list(tokenized["train"].features[n["train"] - 1]["input_ids"])
    gc.collect()
    after, anon_after = rss_bytes(), rss_bytes("RssAnon")
    result = {
        "rank": acc.process_index,
        "note": note,
        "counts": counts,
        "rss_before": before,
        "rss_after": after,
        "anon_growth": anon_after - anon_before,
        "examples": n,
        "first": first,
        "last": last,
    }
    with open(f"{out}-rank{acc.process_index}.json", "w") as f:
        json.dump(result, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
