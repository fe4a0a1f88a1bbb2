"""merge without training: adapters made directly with peft on the tiny models (non-zero B, so the
update is real), merged, verified, and every way a merge can go wrong on disk."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftcli.cli import app
from ftcli.errors import FtcliError
from ftcli.merge import compare, logits_on, merge, run_test_features, sample_batches
from ftcli.models import load_base_for
from ftcli.rundir import find_source
from ftcli.util import file_hashes

LABELS = ["neg", "pos"]


def make_adapter(
    base_dir: Path, out: Path, task: str, targets: list[str], scale_b: float = 1.0
) -> Path:
    """A LoRA adapter with random A and B (peft's init_lora_weights=False) and ftcli's record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir,
            num_labels=2,
            id2label=dict(enumerate(LABELS)),
            label2id={k: i for i, k in enumerate(LABELS)},
            pad_token_id=tok.pad_token_id,
        )
        task_type = "SEQ_CLS"
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        task_type = "CAUSAL_LM"
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, task_type=task_type, init_lora_weights=False
    )
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale_b)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "ftcli.json").write_text(
        json.dumps(
            {
                "base_model": str(base_dir),
                "base_model_dir": str(base_dir),
                "task": task,
                "method": {"kind": "lora", "r": 4, "alpha": 8.0},
                "labels": LABELS if task == "classification" else None,
                "sha256": file_hashes(out, "*.safetensors"),  # as ftcli writes it
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "classification": make_adapter(
            tiny_models["bert"], root / "cls", "classification", ["query", "value"]
        ),
        "causal_lm": make_adapter(
            tiny_models["llama"], root / "lm", "causal_lm", ["q_proj", "v_proj"]
        ),
    }


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_merge_is_equivalent_and_not_trivial(adapters, tmp_path, task):
    from transformers import AutoTokenizer

    from ftcli.models import base_dir
    from ftcli.rundir import read_model_record

    m = merge(adapters[task], tmp_path / "out")
    assert (
        m.saved_check["passed"] and m.fold_check["relative_diff"] < 1e-4 and m.relative_diff < 1e-4
    )
    assert m.prediction_agreement == 1.0 and m.fold_check["prediction_agreement"] == 1.0
    assert m.lora_modules_merged == 4  # 2 layers x (query|q_proj, value|v_proj)
    assert m.sample_source == "built-in sentences"
    # the adapter really changes the model: merged logits are far from the base's own
    rec = read_model_record(adapters[task])
    tok = AutoTokenizer.from_pretrained(adapters[task])
    batches = sample_batches(tok, None)
    from ftcli.models import model_class

    merged = model_class(task).from_pretrained(tmp_path / "out").eval()
    base = load_base_for(rec, base_dir(rec, None), "original", tok)
    if task == "classification":  # the head is fresh per load: only the encoder is comparable
        base.classifier.load_state_dict(merged.classifier.state_dict())
    moved = compare(logits_on(base, batches, task), logits_on(merged, batches, task))
    assert moved["max_logit_diff"] > 100 * max(m.max_logit_diff, 1e-7)


def test_saved_folder_is_complete(adapters, tmp_path):
    m = merge(adapters["classification"], tmp_path / "out")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "merge.json",
        "README.md",
        "tokenizer.json",
    } <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    assert "quantization_config" not in cfg
    saved = json.loads((out / "merge.json").read_text())
    assert saved["passed"] and saved["parameters"] == m.parameters and saved["labels"] == LABELS
    card = (out / "README.md").read_text()
    assert "W = W0 + (alpha/r) B A" in card and f"{m.parameters:,} parameters" in card
    assert "merge check (float32)" in card and "classifier" in card


def test_causal_folder_has_generation_config_and_chat_template(adapters, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    merge(adapters["causal_lm"], tmp_path / "out")
    tok_in = AutoTokenizer.from_pretrained(adapters["causal_lm"])
    tok_out = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok_out.chat_template and tok_out.chat_template == tok_in.chat_template
    gc = GenerationConfig.from_pretrained(tmp_path / "out")
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    assert tok_in.eos_token_id in eos
    assert gc.pad_token_id == tok_in.pad_token_id


def test_refuses_existing_out_dir_and_force_replaces_it(adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FtcliError, match="already exists"):
        merge(adapters["classification"], out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(adapters["classification"], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "merge.json").exists()
    assert _leftovers(tmp_path) == []


def test_never_replaces_the_adapter_itself(adapters):
    with pytest.raises(FtcliError, match="holds what is being merged"):
        merge(adapters["classification"], adapters["classification"], force=True)
    assert (adapters["classification"] / "adapter_config.json").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_merge_leaves_nothing(adapters, tmp_path, monkeypatch, existing):
    """SIGTERM (or Ctrl-C) after the weights are written but before the rename: no OUT_DIR, no
    temporary folder, and an OUT_DIR being replaced with --force is left as it was."""
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous merge")
    original = PreTrainedModel.save_pretrained

    def save_then_die(self, path, *a, **kw):
        original(self, path, *a, **kw)
        assert any(Path(path).iterdir())  # the weights are on disk, in the temporary folder
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merge(adapters["classification"], out, force=existing)
    assert _leftovers(tmp_path) == []
    if existing:
        assert [p.name for p in out.iterdir()] == ["old.txt"]
    else:
        assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_not_enough_disk_space_is_found_before_writing(adapters, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage

    def tiny_disk(path):
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr("ftcli.merge.shutil.disk_usage", tiny_disk)
    with pytest.raises(FtcliError, match="not enough disk space") as err:
        merge(adapters["classification"], tmp_path / "out")
    assert "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_fails_with_exit_1_and_writes_nothing(tiny_models, tmp_path):
    """A huge update merges fine in float32 but overflows float16: the saved-folder check catches it."""
    adapter = make_adapter(
        tiny_models["llama"], tmp_path / "big", "causal_lm", ["q_proj", "v_proj"], scale_b=3e5
    )
    res = CliRunner().invoke(
        app, ["merge", str(adapter), str(tmp_path / "out"), "--dtype", "float16"]
    )
    assert res.exit_code == 1, res.output
    assert "merge verification failed" in res.output and "float16" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    ok = merge(adapter, tmp_path / "out32")  # the same adapter in float32 is fine
    assert ok.saved_check["passed"]


def test_cli_merge_json_and_usage_errors(adapters, tmp_path):
    r = CliRunner().invoke(
        app, ["merge", str(adapters["classification"]), str(tmp_path / "o"), "--json"]
    )
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["ok"] and obj["passed"] and obj["labels"] == LABELS
    r = CliRunner().invoke(
        app, ["merge", str(adapters["classification"]), str(tmp_path / "o2"), "--dtype", "int8"]
    )
    assert r.exit_code == 1 and "--dtype 'int8'" in r.output
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "nowhere"), str(tmp_path / "o3")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(app, ["merge", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output


def test_base_override_is_used(adapters, tiny_models, tmp_path):
    """--base names the model to merge into; a model the adapter does not fit is one clear error."""
    with pytest.raises(FtcliError, match="cannot load the base model and the adapter together"):
        merge(adapters["causal_lm"], tmp_path / "o", base=str(tiny_models["bert"]))
    assert not (tmp_path / "o").exists()


def test_find_source(tmp_path, adapters):
    assert find_source(adapters["classification"]).kind == "adapter"
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "run.json").write_text("{}")
    src = find_source(run)
    assert src.kind == "full" and src.run_dir == run
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtcliError, match="no LoRA adapter or fine-tuned model"):
        find_source(tmp_path / "empty")


def test_test_examples_with_unicode_line_separators(tmp_path, tiny_models):
    """A test split holding U+0085 / U+2028 inside a text (real review data does) still loads."""
    from transformers import AutoTokenizer

    from ftcli.data.examples import PreparedData, save_prepared
    from tests.conftest import tiny_recipe

    run = tmp_path / "run"
    rows = [
        {"text": "good film\x85really", "label": "pos"},
        {"text": "bad\u2028film", "label": "neg"},
    ]
    save_prepared(
        PreparedData({"train": rows, "validation": [], "test": rows}, ["neg", "pos"]), run / "data"
    )
    import yaml

    recipe = tiny_recipe(tmp_path, tiny_models, {"classification": "x.csv", "chat": "x.jsonl"})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    feats = run_test_features(run, AutoTokenizer.from_pretrained(tiny_models["bert"]))
    assert [f["labels"] for f in feats] == [1, 0]
