"""`python -m ftcli` and `accelerate launch -m ftcli train recipe.yaml`."""

from ftcli.cli import main

main()
