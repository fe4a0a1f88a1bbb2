"""The ``cli`` fixture: run ``ftcli ARGS`` in this process and get (exit code, stdout, stderr)."""

from __future__ import annotations

import pytest

from ftcli.cli import main


@pytest.fixture
def cli(capsys):
    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        cap = capsys.readouterr()
        return exc.value.code, cap.out, cap.err

    return run
