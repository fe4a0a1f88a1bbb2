"""bench/gpu_smoke.sh's plumbing on the CPU: one stage of the rehearsal end to end (smoke.json's
schema, CUDA-only checks SKIP with their reason), and the verdict logic a GPU run relies on (a
timed-out or crashed stage is a FAIL, never the end of the run; the exit status counts FAILs).
CI runs the whole rehearsal (.ci/run); this keeps pytest to its fastest stage."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "bench" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_stage0_rehearsal_writes_smoke_json_with_reasoned_skips(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable}
    p = subprocess.run(
        ["bash", "bench/gpu_smoke.sh", "--rehearse-on-cpu", "--stages", "0"]
        + ["--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS 0 preflight" in p.stdout
    smoke = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert smoke["mode"] == "rehearse-on-cpu"
    assert smoke["failures"] == 0 and smoke["counts"] == {"PASS": 1, "FAIL": 0, "SKIP": 0}
    stage = smoke["stages"]["0"]
    assert {"name", "status", "seconds", "figures", "checks", "reason"} <= set(stage)
    assert stage["status"] == "PASS" and stage["seconds"] >= 0
    assert stage["checks"]["nf4.cpu"]["status"] == "PASS"  # the CPU half of the NF4 comparison
    assert "bitsandbytes" in stage["figures"]["kernels"]
    for name in ("cuda.available", "cuda.driver", "nf4.gpu_vs_cpu"):
        check = stage["checks"][name]
        assert check["status"] == "SKIP"
        assert "CPU rehearsal" in check["detail"] and "CUDA-only" in check["detail"]
    assert stage["reason"].startswith("skipped: ") and "nf4.gpu_vs_cpu" in stage["reason"]


def test_timeout_and_crash_are_failures_and_the_exit_counts_them(tmp_path, capsys):
    gs = _smoke()
    st = gs.Stage(2, tmp_path, rehearse=True)
    st.check("train.completed", True, "ok")
    gs.finish(2, tmp_path, 124, 70.0, 70)  # killed by timeout: what it found is kept
    gs.Stage(3, tmp_path, rehearse=True).skip("x", "CPU rehearsal: y is a CUDA-only assertion")
    gs.finish(3, tmp_path, 0, 1.0, 70)  # nothing but skips: SKIP
    gs.finish(4, tmp_path, 1, 1.0, 70)  # crashed before recording anything
    failures = gs.summary(tmp_path, tmp_path / "smoke.json", [2, 3, 4, 5], True, 72.0)
    out = capsys.readouterr().out
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    s = smoke["stages"]
    assert s["2"]["status"] == "FAIL" and "70 s timeout" in s["2"]["reason"]
    assert s["2"]["checks"]["train.completed"]["status"] == "PASS"
    assert s["3"]["status"] == "SKIP" and "CUDA-only" in s["3"]["reason"]
    assert s["4"]["status"] == "FAIL" and "exited 1" in s["4"]["reason"]
    assert s["5"]["status"] == "FAIL" and s["5"]["reason"] == "the stage left no record"
    assert failures == smoke["failures"] == 3
    assert "FAIL 2 lora-classification" in out and "SKIP 3 chat-lora-packing" in out
