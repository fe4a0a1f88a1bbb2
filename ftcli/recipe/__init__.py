"""The recipe: a strict, frozen schema and a loader that reports every problem at once.

One role per module, each importing only those listed before it:

- ``applies``: when each key takes effect (``APPLIES``, ``METHOD_KEYS``) and the code reading it;
- ``origin``: the file and line of each dotted key (``RecipeOrigin``, the YAML line maps);
- ``schema``: the frozen pydantic models, ``Recipe`` and its sections;
- ``suggest``: did-you-mean, and pydantic's errors as located problems for the user;
- ``checks``: semantic checks of a validated Recipe;
- ``load``: YAML, ``extends:``, ``--set``, path anchoring and validation (``load_recipe``).

This module only re-exports their public names, so ``from ftcli.recipe import X`` keeps working;
modules inside the package import from each other, never from here.
"""

from __future__ import annotations

from ftcli.recipe.applies import (
    ALWAYS,
    APPLIES,
    BLOCK_KINDS,
    LORA_KINDS,
    METHOD_KEYS,
    PROMPT_KINDS,
    Applies,
)
from ftcli.recipe.checks import space_values
from ftcli.recipe.load import (
    LORA_KEYS,
    PATH_KEYS,
    anchor_paths,
    apply_overrides,
    bundled_recipes_dir,
    data_part,
    drop_inapplicable,
    labels_as_strings,
    load_recipe,
    parse_override,
    recipe_from_mapping,
    resolve_recipe_path,
)
from ftcli.recipe.origin import MAX_NODES, RecipeOrigin
from ftcli.recipe.schema import (
    SPACE_KINDS,
    AddedTokenSpec,
    AugmentOp,
    AugmentSpec,
    CleanSpec,
    DataSpec,
    Dtype,
    EarlyStoppingSpec,
    EvalSpec,
    HeadSpec,
    MergeSpec,
    MethodSpec,
    ModelSpec,
    OptimizerName,
    OptimizerSpec,
    ParaphraseSpec,
    QuantSpec,
    Recipe,
    SchedulerSpec,
    SplitSpec,
    TrainSpec,
    TuneSpec,
    UnfreezeSpec,
)
from ftcli.recipe.suggest import ALIASES, suggest_key

__all__ = [
    "ALIASES",
    "ALWAYS",
    "APPLIES",
    "BLOCK_KINDS",
    "LORA_KEYS",
    "LORA_KINDS",
    "MAX_NODES",
    "METHOD_KEYS",
    "PATH_KEYS",
    "PROMPT_KINDS",
    "SPACE_KINDS",
    "AddedTokenSpec",
    "Applies",
    "AugmentOp",
    "AugmentSpec",
    "CleanSpec",
    "DataSpec",
    "Dtype",
    "EarlyStoppingSpec",
    "EvalSpec",
    "HeadSpec",
    "MergeSpec",
    "MethodSpec",
    "ModelSpec",
    "OptimizerName",
    "OptimizerSpec",
    "ParaphraseSpec",
    "QuantSpec",
    "Recipe",
    "RecipeOrigin",
    "SchedulerSpec",
    "SplitSpec",
    "TrainSpec",
    "TuneSpec",
    "UnfreezeSpec",
    "anchor_paths",
    "apply_overrides",
    "bundled_recipes_dir",
    "data_part",
    "drop_inapplicable",
    "labels_as_strings",
    "load_recipe",
    "parse_override",
    "recipe_from_mapping",
    "resolve_recipe_path",
    "space_values",
    "suggest_key",
]
