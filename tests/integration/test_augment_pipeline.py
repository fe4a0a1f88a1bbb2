"""data.augment in a real run: copies marked in data/train.jsonl and counted in data.json, and
paraphrases written by the tiny Llama through predict's generation code, filtered."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, tiny_recipe, trained_run, write_recipe

pytestmark = pytest.mark.slow


def test_run_marks_and_counts_augmented_copies(tmp_path, tiny_models, tiny_data, capsys):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, arch="bert")
    m["train"].update(max_steps=2)
    m["merge"] = {"enabled": False}
    m["data"]["augment"] = {"copies": 1, "ops": ["swap", "delete", "typo"], "p": 0.2, "seed": 3}
    path = write_recipe(tmp_path / "aug.yaml", **m)
    code, run = run_cli(capsys, "train", str(path))
    assert code == 0, run
    data_dir = tmp_path / "runs" / m["name"] / "data"
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    marked = [r for r in rows if "augmented" in r]
    stats = json.loads((data_dir / "data.json").read_text())
    assert marked and len(marked) == stats["augmented"]["added"]
    assert stats["sizes"]["train"] == len(rows)
    for split in ("validation", "test"):
        text = (data_dir / f"{split}.jsonl").read_text()
        assert "augmented" not in text
    assert run["data"]["augmented"]["by_op"].keys() == {"swap", "delete", "typo"}


def test_paraphrases_come_from_the_causal_lm_and_are_filtered(
    tmp_path, tmp_path_factory, tiny_models, tiny_data
):
    from ftcli.data.examples import prepare
    from ftcli.data.paraphrase import add_paraphrases, clean_answer
    from ftcli.recipe import recipe_from_mapping
    from ftcli.serve.predictor import load_predictor

    judge_run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, arch="bert")
    m["data"]["max_train_examples"] = 24
    m["data"]["augment"] = {
        "ops": [],
        "paraphrase": {
            "model": str(tiny_models["llama"]),
            "max_new_tokens": 12,
            "filter_model": str(judge_run),
        },
    }
    recipe = recipe_from_mapping(m)
    prepared = prepare(recipe)
    out = add_paraphrases(prepared, recipe, load_predictor)
    train = prepared.splits["train"]
    assert out.splits["validation"] == prepared.splits["validation"]
    assert out.splits["test"] == prepared.splits["test"]
    copies = out.splits["train"][len(train) :]
    aug = out.stats["augmented"]
    info = aug["paraphrase"]
    assert len(copies) == aug["added"] == aug["by_op"]["paraphrase"]
    assert len(copies) + info["dropped_identical"] + info["dropped_label_changed"] == len(train)
    # each copy is what the model generated for its source, as predict would generate it
    gen = load_predictor(str(tiny_models["llama"]))
    from ftcli.data.paraphrase import PROMPT

    sources = [train[c["augmented"]["of"]]["text"] for c in copies]
    answers = gen.generate(
        [[{"role": "user", "content": PROMPT.format(text=s)}] for s in sources], max_new_tokens=12
    )
    assert [c["text"] for c in copies] == [clean_answer(a) for a in answers]
    for c, s in zip(copies, sources, strict=True):
        assert c["text"].casefold() != s.casefold() and c["augmented"]["op"] == "paraphrase"
    # the filter kept only copies the judge labels like their source
    judge = load_predictor(str(judge_run))
    if copies:
        verdicts = judge.classify([c["text"] for c in copies])
        assert [v["label"] for v in verdicts] == [c["label"] for c in copies]
