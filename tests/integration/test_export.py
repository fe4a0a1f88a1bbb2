"""ftcli export on a fine-tuned tiny Llama, checked by llama.cpp's runtime: f16 and q8_0 agree with
merged/ within the stated tolerances, a corrupted file is caught and nothing is left, and the
Ollama format writes a Modelfile whose template renders what the chat template does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcli.errors import FtcliError
from tests.conftest import run_cli, trained_run

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'ftcli[export]')"
)

_MERGED: dict = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models, tiny_data) -> Path:
    """A chat LoRA run trained a few steps, then merged into RUN/merged/ (as `ftcli merge` does)."""
    from ftcli.merge import merge

    if "run" not in _MERGED:
        r = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
        merge(r / "adapter", r / "merged", force=True)
        _MERGED["run"] = r
    return _MERGED["run"]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_export_agrees_with_merged_within_tolerance(run, tmp_path, quant):
    from ftcli.export import TOLERANCE, export
    from ftcli.rundir import read_export_records

    out = tmp_path / f"m-{quant}.gguf"
    r = export(run, quant=quant, out=out)
    assert r.passed and out.is_file() and r.bytes == out.stat().st_size
    lp, g = r.logprob_check, r.greedy_check
    assert r.sample_source == "test examples" and lp["positions"] > 100
    assert lp["max_abs_diff"] <= TOLERANCE[quant]["max"]
    assert lp["mean_abs_diff"] <= TOLERANCE[quant]["mean"]
    assert g["prompts"] >= 4 and not g["unexplained"]
    assert r.tokenizer_check["passed"] and r.tokenizer_check["texts"] >= 4
    assert r.template_check["identical"]
    assert any(Path(e.path) == out for e in read_export_records(run))
    card = (run / "merged" / "README.md").read_text()
    assert "## GGUF exports" in card and out.name in card


def test_a_corrupted_file_is_caught_and_nothing_is_left(run, tmp_path, monkeypatch):
    """One tensor's bytes garbled after the writer wrote them: the check fails, the temporary
    file is removed, the target path stays empty."""
    import numpy as np
    from gguf import GGUFReader

    import ftcli.export as ex

    real = ex.write_gguf

    def garbled(model, tok, path, quant, name, template):
        real(model, tok, path, quant, name, template)
        t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
        with open(path, "r+b") as f:
            f.seek(int(t.data_offset))
            f.write(np.random.default_rng(0).bytes(int(t.n_bytes)))

    monkeypatch.setattr(ex, "write_gguf", garbled)
    out = tmp_path / "bad.gguf"
    with pytest.raises(FtcliError, match="export check failed .*nothing was written"):
        ex.export(run, quant="f16", out=out)
    assert list(tmp_path.iterdir()) == []


def test_q_k_rows_left_in_hf_order_are_caught(run, tmp_path, monkeypatch):
    import ftcli.export as ex

    monkeypatch.setattr(ex, "rotary_rows", lambda w, n: w)
    out = tmp_path / "unpermuted.gguf"
    with pytest.raises(FtcliError, match="next-token log-probs"):
        ex.export(run, quant="q8_0", out=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ollama_writes_a_modelfile_beside_the_gguf(run, tmp_path, capsys):
    out = tmp_path / "chat.gguf"
    code, res = run_cli(capsys, "export", str(run), "--format", "ollama", "--out", str(out))
    assert code == 0 and res["ok"] and res["format"] == "ollama"
    mf = (tmp_path / "chat.Modelfile").read_text()
    assert mf.startswith("FROM ./chat.gguf\n") and 'PARAMETER stop "<|im_end|>"' in mf
    assert "{{ range .Messages }}" in mf and res["template_check"]["ollama_identical"]
    # an existing file is refused without --force
    code, res = run_cli(capsys, "export", str(run), "--out", str(out))
    assert code == 1 and "already exists" in res["error"]


def test_the_default_path_is_in_the_run_folder(run, capsys):
    code, res = run_cli(capsys, "export", str(run), "--quant", "q8_0", "--force")
    assert code == 0, res
    want = run / "export" / f"{run.name}-q8_0.gguf"
    assert Path(res["path"]) == want and want.is_file()
    recs = json.loads((run / "export" / "export.json").read_text())["exports"]
    assert recs[want.name]["logprob_check"]["passed"]
