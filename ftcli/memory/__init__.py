"""``ftcli estimate-memory``: what a training run will hold at its peak, before any weights are read.

``plan`` reads a model's config, builds it on the meta device and inventories its parameters;
``estimate`` turns the inventory and a run's ``Setup`` into a peak; ``preflight`` is the check
``ftcli train`` runs first; ``measure`` runs real steps to check the figure; ``report`` prints it.
"""

from __future__ import annotations

from ftcli.memory.estimate import Estimate, estimate
from ftcli.memory.plan import Plan, plan_model, plan_recipe, setup_from_recipe
from ftcli.memory.preflight import check_fits_device, preflight
from ftcli.memory.setup import Setup, parse_budget

__all__ = [
    "Plan",
    "Setup",
    "Estimate",
    "estimate",
    "parse_budget",
    "plan_model",
    "plan_recipe",
    "setup_from_recipe",
    "check_fits_device",
    "preflight",
]
