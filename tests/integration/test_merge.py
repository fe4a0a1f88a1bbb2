"""merge on runs ftcli trained: full / LoRA / QLoRA on both tasks, QLoRA into dequantized vs
original weights, and the merged folder loaded by plain transformers in a process with no ftcli."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftcli.merge import (
    compare,
    logits_on,
    merge,
    run_test_features,
    sample_batches,
)
from ftcli.models import base_dir, load_base_for, model_class
from ftcli.rundir import read_model_record
from tests.conftest import trained_run


def _reference(run: Path, task: str):
    """Inputs and logits of the un-merged trained model (base + adapter, or model/)."""
    from transformers import AutoTokenizer

    sub = run / ("model" if (run / "model").exists() else "adapter")
    tok = AutoTokenizer.from_pretrained(sub)
    batches = sample_batches(tok, run_test_features(run, tok))
    return tok, batches


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_merge_equivalence(tmp_path_factory, tiny_models, tiny_data, tmp_path, task, kind):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, task, kind)
    m = merge(run, tmp_path / "merged")
    assert m.saved_check["passed"] and m.method == kind and m.sample_source == "test examples"
    assert m.relative_diff < 1e-4 and m.prediction_agreement == 1.0
    assert 8 <= m.samples <= 16
    tok, batches = _reference(run, task)
    merged = model_class(task).from_pretrained(tmp_path / "merged").eval()
    out = logits_on(merged, batches, task)
    if kind == "full":
        assert m.fold_check is None and m.lora_modules_merged == 0
        ref = logits_on(model_class(task).from_pretrained(run / "model").eval(), batches, task)
    else:
        from peft import PeftModel

        assert m.fold_check["relative_diff"] < 1e-4 and m.lora_modules_merged == 4
        rec = read_model_record(run / "adapter")
        ref = logits_on(
            PeftModel.from_pretrained(
                load_base_for(rec, base_dir(rec, None), "dequantized", tok), run / "adapter"
            ).eval(),
            batches,
            task,
        )
        if task == "classification":
            assert m.saved_modules == ["score"]  # the trained head came along
    figures = compare(ref, out)
    assert figures["relative_diff"] < 1e-4 and figures["prediction_agreement"] == 1.0
    if kind == "qlora":
        d = m.dequantized_vs_original
        assert d["other"] == "original" and d["max_logit_diff"] > 10 * max(m.max_logit_diff, 1e-7)


def test_qlora_dequantized_answers_like_the_trained_adapter(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    """Merging into the dequantized NF4 weights reproduces the 4-bit base + adapter the run trained;
    merging into the original weights does not, by about what merge.json reports."""
    from peft import PeftModel

    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "qlora")
    deq = merge(run, tmp_path / "deq")
    orig = merge(run, tmp_path / "orig", into="original")
    assert deq.into == "dequantized" and orig.into == "original"
    tok, batches = _reference(run, "classification")
    rec = read_model_record(run / "adapter")
    as_trained = PeftModel.from_pretrained(
        load_base_for(rec, base_dir(rec, None), "quantized", tok), run / "adapter"
    ).eval()
    ref = logits_on(as_trained, batches, "classification")
    cls = model_class("classification")
    got_deq = logits_on(cls.from_pretrained(tmp_path / "deq").eval(), batches, "classification")
    got_orig = logits_on(cls.from_pretrained(tmp_path / "orig").eval(), batches, "classification")
    to_deq, to_orig = compare(ref, got_deq), compare(ref, got_orig)
    assert to_deq["relative_diff"] < 1e-4
    assert to_orig["max_logit_diff"] > 10 * max(to_deq["max_logit_diff"], 1e-6)
    # what the summary said about the other choice is what the two folders differ by
    between = compare(got_deq, got_orig)["max_logit_diff"]
    assert deq.dequantized_vs_original["max_logit_diff"] == pytest.approx(
        between, rel=1e-2, abs=1e-5
    )
    assert orig.dequantized_vs_original["other"] == "dequantized"


# Run with `python -S`: site-packages is added by hand, without its .pth files, so the editable
# install of ftcli is not importable at all; peft is installed but must not be imported.
PLAIN_LOAD = r"""
import importlib.util, json, sys
sys.path.append(sys.argv.pop(1))
assert importlib.util.find_spec("ftcli") is None, "ftcli is importable"
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
folder, task, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
model = cls.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0].tolist()
out = {"logits": logits, "id2label": model.config.id2label, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("ftcli", "peft")),
       "chat_template": bool(tok.chat_template)}
if task != "classification":
    gen = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    out["generated"] = gen[0].tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_merged_folder_loads_with_plain_transformers(
    tmp_path_factory, tiny_models, tiny_data, tmp_path, task
):
    import torch

    run = trained_run(tmp_path_factory, tiny_models, tiny_data, task, "lora")
    merge(run, tmp_path / "m")
    tok, _ = _reference(run, task)
    ids = (
        tok("the film was good")["input_ids"]
        if task == "classification"
        else tok("what is 2 plus 3 ?")["input_ids"]
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    import torch as _t

    site = str(Path(_t.__file__).parent.parent)
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PLAIN_LOAD, site, str(tmp_path / "m"), task, json.dumps(ids)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    from peft import PeftModel

    rec = read_model_record(run / "adapter")
    ref_model = PeftModel.from_pretrained(
        load_base_for(rec, base_dir(rec, None), "original", tok), run / "adapter"
    ).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-4, rtol=1e-4)
    if task == "classification":
        assert got["id2label"] == {"0": "neg", "1": "pos"}
    else:
        assert got["chat_template"]
        with torch.no_grad():
            want = ref_model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False
            )
        assert got["generated"] == want[0].tolist()


def test_bfloat16_merge_is_smaller_and_within_its_tolerance(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    from safetensors import safe_open

    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    m = merge(run, tmp_path / "bf16", dtype="bfloat16")
    assert m.saved_check["passed"] and m.tolerance == 0.1 and m.fold_check["relative_diff"] < 1e-4
    assert 0 < m.relative_diff <= 0.1  # rounding shows, within the bf16 tolerance
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"torch.bfloat16"}
