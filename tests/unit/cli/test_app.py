"""The app as a whole (ftcli/cli/app.py, ftcli/cli/__init__.py): flags shown as flags, completion
offered, and the commands listed in their order."""

from __future__ import annotations


def test_boolean_flags_are_shown_without_a_value(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("train", "--help")
    assert code == 0
    line = next(x for x in out.splitlines() if x.lstrip("│ ").startswith("--resume"))
    assert "<bool>" not in out and "Continue from the run's latest" in line
    code, out, _ = cli("eval", "--help")
    assert "--robustness" in out and "<bool>" not in out


def test_merge_names_what_it_takes_and_completion_is_offered(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = cli("merge", "--help")
    assert "RUN_OR_TRAINED_DIR" in out and "ADAPTER_DIR" not in out.replace("RUN_OR_TRAINED", "")
    _, out, _ = cli("--help")
    assert "--install-completion" in out
