"""``ftcli merge`` (ftcli/cli/merge.py): its flag errors and the table it prints of what merge
verified (the merge itself is tested in tests/unit/test_merge.py)."""

from __future__ import annotations

import ftcli.merge
from ftcli.rundir import MergeRecord


def test_unknown_dtype_or_into_is_one_message(cli, tmp_path):
    code, _, err = cli("merge", str(tmp_path / "a"), str(tmp_path / "o"), "--into", "sideways")
    assert code == 1
    assert "error: --into 'sideways' is not one of: dequantized, original" in err
    code, _, err = cli("merge", str(tmp_path / "a"), str(tmp_path / "o"), "--dtype", "int8")
    assert code == 1 and "--dtype 'int8' is not one of: float32, bfloat16, float16" in err


def _record(**kw) -> MergeRecord:
    check = {"max_logit_diff": 2e-3, "relative_diff": 4e-4, "tolerance": 0.1}
    fields = {
        "out_dir": "out/m",
        "base_model": "some/base",
        "task": "causal_lm",
        "method": "qlora",
        "into": "dequantized",
        "dtype": "bfloat16",
        "samples": 16,
        "sample_source": "test examples",
        "fold_check": {**check, "max_logit_diff": 1e-6, "relative_diff": 1e-7, "tolerance": 1e-4,
                       "prediction_agreement": 1.0},
        "saved_check": {**check, "prediction_agreement": 0.9375, "passed": True},
        "lora_modules_merged": 60,
        "saved_modules": ["score"],
        "parameters": 134_515_008,
        "dequantized_vs_original": {"other": "original", "max_logit_diff": 0.5,
                                    "relative_diff": 0.02, "prediction_agreement": 0.875},
        "labels": None,
        "bytes_written": 3 * 2**20,
        "seconds": 4.25,
    }  # fmt: skip
    return MergeRecord(**{**fields, **kw})


def test_the_table_shows_both_checks_and_what_was_written(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(ftcli.merge, "merge", lambda *a, **k: _record())
    code, out, _ = cli("merge", str(tmp_path / "a"), str(tmp_path / "o"))
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert "merged -> out/m (verified)" in text
    assert "merged into dequantized weights, saved bfloat16" in text
    assert "parameters 134,515,008" in text and "LoRA modules folded 60" in text
    assert "saved modules score" in text
    assert (
        "merge check (float32) max logit difference 1.000e-06 (1.00e-07 relative, tolerance 0.0001), predictions agree 100.0%"
        in text
    )
    assert (
        "saved folder (bfloat16) max logit difference 2.000e-03 (4.00e-04 relative, tolerance 0.1), predictions agree 93.8% on 16 test examples"
        in text
    )
    assert (
        "vs merging into original max logit difference 5.000e-01 (2.00e-02 relative), predictions agree 87.5%"
        in text
    )
    assert "written 3.0 MiB in 4.2 s" in text
    monkeypatch.setattr(
        ftcli.merge,
        "merge",
        lambda *a, **k: _record(fold_check=None, saved_modules=[], dequantized_vs_original=None),
    )  # a full fine-tuning export: nothing folded, nothing to compare
    code, out, _ = cli("merge", str(tmp_path / "a"), str(tmp_path / "o"))
    assert code == 0
    assert "merge check" not in out and "saved modules" not in out and "vs merging" not in out
