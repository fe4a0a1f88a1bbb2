"""ftcli: config-driven fine-tuning (full, LoRA, QLoRA) that proves what it did."""

__version__ = "0.1.0"
