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


def test_help_lists_the_commands_in_their_order(cli, monkeypatch):
    """The command modules register on import; ftcli/cli/__init__.py imports them in this order."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("--help")
    assert code == 0
    listed = [  # a command's row starts at the border; a wrapped help line is indented past it
        line.strip("│ ").split()[0]
        for line in out.split("Commands")[1].splitlines()
        if line.startswith("│ ") and not line.startswith("│  ")
    ]
    assert listed == [
        "train",
        "validate",
        "recipes",
        "prepare",
        "cache",
        "eval",
        "cv",
        "tune",
        "merge",
        "estimate-memory",
        "predict",
        "chat",
        "serve",
        "feedback",
    ]


def test_python_dash_m_runs_the_same_app():
    import subprocess
    import sys

    for module in ("ftcli", "ftcli.cli"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "recipes", "--json"], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert '"ok": true' in proc.stdout
