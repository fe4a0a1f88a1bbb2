"""Padding efficiency (real / processed tokens) of one epoch's micro-batches on the full training
splits of the bundled recipes: random batches padded to the longest (the Trainer default) against
ftcli's length-grouped (and, for causal LMs, packed) batches, with and without widths of 8.

    python bench/padding.py          # ~1 min: tokenizes quickstart, smollm2-cls and chat
"""

from __future__ import annotations

import ftcli.data.tokenize as tokenize_mod
from ftcli.bundled import recipe_path
from ftcli.data.examples import prepare
from ftcli.data.tokenize import collate, pack, tokenize
from ftcli.models import load_tokenizer
from ftcli.recipe import load_recipe
from ftcli.train import batch_plan

CASES = [
    ("quickstart", 32),
    ("smollm2-sentiment-lora", 16),
    ("smollm2-chat-lora", 8),
]


def main() -> None:
    for path, batch in CASES:
        recipe = load_recipe(recipe_path(path))
        tok, _, _ = load_tokenizer(recipe.model)
        prepared = prepare(recipe)
        feats = tokenize(prepared.splits["train"], recipe, tok, prepared.label2id).features
        lengths = [len(f["input_ids"]) for f in feats]
        print(f"{path}: {len(feats)} examples, batches of {batch}")
        default = tokenize_mod.PAD_MULTIPLE
        for multiple in (1, default):
            tokenize_mod.PAD_MULTIPLE = multiple  # collate and pack read it at call time
            for group in (False, True):
                for packed in (False, True) if recipe.task == "causal_lm" else (False,):
                    plan = batch_plan(lengths, batch, 0, 0, group, None, packed)
                    rows = [[feats[i] for i in b] for b in plan]
                    done = sum(
                        (pack(r, 0) if packed else collate(r, 0))["input_ids"].numel() for r in rows
                    )
                    layout = (
                        f"{'grouped' if group else 'random'}, {'packed' if packed else 'padded'}"
                    )
                    print(f"  widths of {multiple}, {layout}: {sum(lengths) / done:.3f}")
        tokenize_mod.PAD_MULTIPLE = default


if __name__ == "__main__":
    main()
