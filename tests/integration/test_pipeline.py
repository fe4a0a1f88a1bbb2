"""End-to-end runs of the whole pipeline on tiny models: every method on both tasks."""

from __future__ import annotations

import json

import pytest

from ftcli.recipe import recipe_from_mapping
from ftcli.run import train_run
from ftcli.ui import UI
from tests.conftest import tiny_recipe


def _run(tmp_path, tiny_models, tiny_data, **kw):
    r = recipe_from_mapping(tiny_recipe(tmp_path, tiny_models, tiny_data, **kw))
    out = train_run(r, UI())
    return r, out


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_classification_methods(tmp_path, tiny_models, tiny_data, kind, arch):
    r, out = _run(tmp_path, tiny_models, tiny_data, task="classification", kind=kind, arch=arch)
    run_dir = r.run_dir
    assert out["status"] == "completed"
    acc = out["eval"]["metrics"]["accuracy"]
    assert acc >= 0.8, f"{kind}/{arch} did not learn the toy task (accuracy {acc})"
    assert (run_dir / ("model" if kind == "full" else "adapter")).is_dir()
    if kind != "full":
        assert out["merge"]["passed"] and out["merge"]["max_logit_diff"] < 1e-4
        assert out["merge"]["prediction_agreement"] == 1.0
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["params"]["trainable"] < saved["params"]["total"] or kind == "full"


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_causal_chat_methods(tmp_path, tiny_models, tiny_data, kind):
    r, out = _run(tmp_path, tiny_models, tiny_data, task="causal_lm", kind=kind, arch="llama")
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < losses[0], losses
    assert out["eval"]["metrics"]["perplexity"] > 1
