"""``python -m ftcli.cli``, as ``python -m ftcli``."""

from ftcli.cli import main

main()
