"""bench/gpu_distributed.py without a GPU: every case's recipe and command is built and passes
`ftcli validate` (--dry-run), a rerun gets a fresh work folder, and the packed causal-LM case runs
under FSDP2 and DDP next to the classification ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dist():
    spec = importlib.util.spec_from_file_location(
        "gpu_distributed", ROOT / "bench" / "gpu_distributed.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_validates_every_case_and_reruns_start_fresh(tmp_path, capsys):
    gd = _dist()
    first, second = gd.fresh_work(tmp_path), gd.fresh_work(tmp_path)
    assert first != second and not any(first.iterdir()) and not any(second.iterdir())
    model, data = gd.build(first)
    cases = gd.plan(first, model, data, ngpu=2, have_ds=False)
    names = [c.name for c in cases]
    assert {"fsdp2-chat-packed", "ddp-chat-packed", "fsdp2-lora", "ddp-nccl-lora"} <= set(names)
    for c in cases:
        assert "--force" in c.extra  # a folder left by an earlier run is replaced, not refused
    chat = {c.name: c for c in cases if c.causal}
    assert chat["fsdp2-chat-packed"].config == "fsdp2.yaml"
    assert chat["ddp-chat-packed"].config == "multi-gpu.yaml"
    for c in chat.values():
        assert c.recipe == "smollm2-chat-lora" and "data.packing=true" in c.sets
        assert f"output_dir={first / 'runs'}" in c.sets
    assert gd.dry_run(first, cases) == 0
    out = capsys.readouterr().out
    assert out.count("PASS dry-run") == len(cases) and "nothing launched" in out
    assert not (first / "runs").exists()  # nothing trained


def test_dry_run_reports_a_broken_recipe(tmp_path, capsys):
    gd = _dist()
    work = gd.fresh_work(tmp_path)
    bad = gd.chat_packed(work, "broken", "fsdp2.yaml", 2)
    bad.sets.append("method.quantization.compute_dtype=bfloat16")  # an error for LoRA
    assert gd.dry_run(work, [bad]) == 1
    assert "FAIL dry-run broken" in capsys.readouterr().out
