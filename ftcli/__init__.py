"""ftcli: config-driven fine-tuning (full, LoRA, QLoRA) that proves what it did."""

from ftcli import _imports

__version__ = "0.1.0"

_imports.install()
