"""When each recipe key takes effect: the ``APPLIES`` table, the method-kind groups it is written in
(``METHOD_KEYS``), and the code that reads them.

The bottom layer of the recipe package: it imports nothing of the package. A rule reads the
attributes of the recipe it is given and never names the ``Recipe`` class, so ``schema.py`` can
import this module for ``Recipe.to_yaml`` (which leaves out what does not apply) without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ftcli.errors import Problem

# A Recipe (schema.py). schema.py imports this module, so the class is not imported back here.
RecipeLike = Any

PROMPT_KINDS = ("prefix", "prompt", "ptuning")  # virtual tokens: no weights to fold
LORA_KINDS = ("lora", "qlora")
BLOCK_KINDS = ("full", "lora", "qlora", "ia3", "vera")  # what method.layers can restrict
# Which method keys each kind reads; to_yaml drops the others, the checks refuse them when set.
METHOD_KEYS = {
    "r": ("lora", "qlora", "vera"),
    "alpha": LORA_KINDS,
    "dropout": ("lora", "qlora", "vera"),
    "target_modules": ("lora", "qlora", "ia3", "vera"),
    "modules_to_save": ("lora", "qlora", "ia3", "vera"),
    "init": LORA_KINDS,
    "dora": LORA_KINDS,
    "rslora": LORA_KINDS,
    "layers": BLOCK_KINDS,
    "freeze": ("full",),
    "num_virtual_tokens": PROMPT_KINDS,
}
# Which preference losses read each key of the preference section; the checks refuse the others.
PREFERENCE_KEYS = {
    "beta": ("dpo", "ipo", "simpo", "kto"),
    "label_smoothing": ("dpo",),
    "gamma": ("simpo",),
    "lambda_": ("orpo",),
    "reference": ("dpo", "ipo", "kto"),
    "precompute_reference": ("dpo", "ipo", "kto"),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}


# --------------------------------------------------------------------------- when each key applies

# Every key of the schema declares when it changes the run (tests/unit/recipe/test_applies.py walks
# the schema and fails for a key missing here). A key set in the recipe where its condition is
# false does nothing: that is an error, or a warning where a shared base recipe sets it on purpose.


@dataclass(frozen=True)
class Applies:
    """``when(recipe)`` is true where the key takes effect; ``where`` completes "only applies to"."""

    when: Callable[[RecipeLike], bool]
    where: str
    warn: bool = False  # a warning, not an error: a shared base recipe may set it for other runs


ALWAYS = None  # the key takes effect in every recipe that validates

_ADAM = ("adamw", "adam", "adamw8bit", "paged_adamw", "paged_adamw8bit")
PAIR_TASKS = ("preference", "reward")  # trained on chosen/rejected answers (ftcli/data/pairs.py)


def _has_validation(r: RecipeLike) -> bool:
    return bool(r.data.validation_path) or r.data.split.validation > 0


APPLIES: dict[str, Applies | None] = {
    "name": ALWAYS,
    "task": ALWAYS,
    "description": ALWAYS,
    "output_dir": ALWAYS,
    # model
    "model": ALWAYS,
    "model.name": ALWAYS,
    "model.revision": ALWAYS,
    # with a prompt-style method or frozen embeddings: a recipe error of its own (checks.py)
    "model.add_tokens": ALWAYS,
    "model.add_tokens.content": ALWAYS,
    "model.add_tokens.special": ALWAYS,
    "model.trust_remote_code": ALWAYS,
    "model.dtype": ALWAYS,
    "model.attn_implementation": ALWAYS,
    "model.head": ALWAYS,  # a causal LM with a head: a recipe error of its own
    "model.head.hidden": ALWAYS,
    "model.head.dropout": ALWAYS,
    # data
    "data": ALWAYS,
    "data.path": ALWAYS,  # with data.sources: a recipe error of its own (_mixture_problems)
    # a mixture's entries: wrong combinations are recipe errors of their own (_mixture_problems)
    "data.sources": ALWAYS,
    **{
        f"data.sources.{k}": ALWAYS
        for k in (
            "path",
            "name",
            "weight",
            "max_examples",
            "format",
            "subset",
            "hub_split",
            "text_column",
            "label_column",
            "prompt_column",
            "completion_column",
            "instruction_column",
            "input_column",
            "output_column",
            "messages_column",
            "system_prompt",
        )
    },
    "data.format": ALWAYS,
    "data.subset": ALWAYS,
    "data.hub_split": ALWAYS,
    "data.text_column": Applies(
        lambda r: r.task == "classification" or (r.task == "causal_lm" and r.data.style == "text"),
        "classification or plain-text causal_lm data",
        warn=True,
    ),
    "data.label_column": Applies(
        lambda r: r.task in ("classification", "preference"),
        "task classification, or preference's unpaired (KTO) rows",
    ),
    "data.labels": Applies(lambda r: r.task == "classification", "task classification"),
    "data.prompt_column": Applies(
        lambda r: r.task in ("causal_lm", *PAIR_TASKS), "task causal_lm, preference or reward"
    ),
    "data.completion_column": Applies(
        lambda r: r.task in ("causal_lm", "preference"),
        "task causal_lm, or preference's unpaired (KTO) rows",
    ),
    "data.instruction_column": Applies(lambda r: r.task == "causal_lm", "task causal_lm"),
    "data.input_column": Applies(lambda r: r.data.style == "instruction", "instruction data"),
    "data.output_column": Applies(lambda r: r.data.style == "instruction", "instruction data"),
    "data.messages_column": Applies(
        lambda r: r.task in ("causal_lm", *PAIR_TASKS), "task causal_lm, preference or reward"
    ),
    "data.chosen_column": Applies(lambda r: r.task in PAIR_TASKS, "task preference or reward"),
    "data.rejected_column": Applies(lambda r: r.task in PAIR_TASKS, "task preference or reward"),
    "data.system_prompt": Applies(
        lambda r: (
            (r.task == "causal_lm" and r.data.style in ("chat", "instruction"))
            or r.task in PAIR_TASKS
        ),
        "chat or instruction data, or preference and reward pairs (their message prompts)",
    ),
    "data.split": ALWAYS,
    "data.split.validation": Applies(lambda r: not r.data.validation_path, "no validation_path"),
    "data.split.test": Applies(lambda r: not r.data.test_path, "no test_path"),
    "data.split.seed": ALWAYS,
    "data.split.stratify": Applies(
        lambda r: r.task == "classification" and not r.data.streaming,
        "task classification without data.streaming (a streamed split is by hash)",
        warn=True,
    ),
    "data.validation_path": ALWAYS,
    "data.test_path": ALWAYS,
    "data.max_length": ALWAYS,
    "data.num_proc": ALWAYS,
    "data.long_documents": Applies(
        lambda r: r.task == "classification", "task classification", warn=True
    ),
    "data.max_train_examples": ALWAYS,
    "data.max_validation_examples": Applies(_has_validation, "a run with a validation split"),
    "data.max_test_examples": ALWAYS,
    "data.clean": ALWAYS,
    "data.clean.strip": ALWAYS,
    "data.clean.drop_empty": ALWAYS,
    "data.clean.dedupe": ALWAYS,
    "data.loss_on": Applies(lambda r: r.task == "causal_lm", "task causal_lm", warn=True),
    "data.add_eos": Applies(
        lambda r: r.task in ("causal_lm", *PAIR_TASKS),
        "task causal_lm, preference or reward",
        warn=True,
    ),
    "data.train_on": Applies(
        lambda r: r.task == "causal_lm" and r.data.style == "chat" and r.data.loss_on != "all",
        "chat data (causal_lm, data.messages_column) with data.loss_on: completion",
    ),
    "data.chat_template": Applies(
        lambda r: (
            (r.task == "causal_lm" and r.data.style in ("chat", "instruction"))
            or r.task in PAIR_TASKS
        ),
        "chat or instruction data (causal_lm), or preference/reward pairs (message prompts)",
    ),
    "data.encoding": ALWAYS,
    # speed: packing on a classifier, liger on a CPU... are recipe errors of their own
    "data.packing": ALWAYS,
    # data.streaming: what it cannot do (epochs, augment, encoding auto) are recipe errors of
    # their own (_streaming_problems)
    "data.streaming": ALWAYS,
    "data.shuffle_buffer": Applies(lambda r: r.data.streaming, "data.streaming: true"),
    # augmentation: combinations that add nothing are recipe errors of their own (_augment_problems)
    "data.augment": ALWAYS,
    "data.augment.copies": ALWAYS,
    "data.augment.ops": ALWAYS,
    "data.augment.p": ALWAYS,
    "data.augment.seed": ALWAYS,
    "data.augment.completions": ALWAYS,
    "data.augment.paraphrase": ALWAYS,
    "data.augment.paraphrase.model": ALWAYS,
    "data.augment.paraphrase.max_new_tokens": ALWAYS,
    "data.augment.paraphrase.filter_model": ALWAYS,
    # method
    "method": ALWAYS,
    "method.kind": ALWAYS,
    # the method's own keys: which kinds each applies to is METHOD_KEYS (_strategy_problems)
    **{f"method.{k}": ALWAYS for k in METHOD_KEYS},
    "method.quantization": Applies(lambda r: r.method.kind == "qlora", "method.kind qlora"),
    "method.quantization.bits": ALWAYS,
    "method.quantization.quant_type": Applies(lambda r: r.method.quant.bits == 4, "bits: 4"),
    "method.quantization.double_quant": Applies(lambda r: r.method.quant.bits == 4, "bits: 4"),
    "method.quantization.compute_dtype": Applies(lambda r: r.method.quant.bits == 4, "bits: 4"),
    # train
    "train": ALWAYS,
    # a documented override is not a key ignored in silence: max_steps overrides epochs, and
    # warmup_steps overrides warmup_ratio (their descriptions say so), as a shared base intends
    "train.epochs": Applies(
        lambda r: not r.data.streaming,
        "runs without data.streaming (a stream has no epoch length: train.max_steps decides)",
        warn=True,
    ),
    "train.max_steps": ALWAYS,
    "train.batch_size": ALWAYS,
    "train.gradient_accumulation": ALWAYS,
    "train.optimizer": ALWAYS,
    "train.optimizer.name": ALWAYS,
    "train.optimizer.lr": ALWAYS,
    "train.optimizer.weight_decay": ALWAYS,
    "train.optimizer.betas": Applies(
        lambda r: r.train.optimizer.name in _ADAM, "the adam optimizers", warn=True
    ),
    "train.optimizer.eps": Applies(
        lambda r: r.train.optimizer.name != "sgd", "optimizers other than sgd", warn=True
    ),
    "train.optimizer.momentum": Applies(
        lambda r: r.train.optimizer.name in ("sgd", "rmsprop"), "sgd and rmsprop", warn=True
    ),
    "train.scheduler": ALWAYS,
    "train.scheduler.name": ALWAYS,
    "train.scheduler.warmup_ratio": Applies(
        lambda r: r.train.scheduler.name != "plateau", "schedulers other than plateau"
    ),
    "train.scheduler.warmup_steps": Applies(
        lambda r: r.train.scheduler.name != "plateau", "schedulers other than plateau"
    ),
    "train.scheduler.factor": Applies(
        lambda r: r.train.scheduler.name == "plateau", "the plateau scheduler"
    ),
    "train.scheduler.patience": Applies(
        lambda r: r.train.scheduler.name == "plateau", "the plateau scheduler"
    ),
    "train.max_grad_norm": ALWAYS,
    "train.mixed_precision": ALWAYS,
    "train.gradient_checkpointing": ALWAYS,
    "train.eval_every": Applies(_has_validation, "a run with a validation split"),
    "train.log_every": ALWAYS,
    "train.checkpoint_every": ALWAYS,
    "train.keep_checkpoints": ALWAYS,
    "train.seed": ALWAYS,
    "train.device": ALWAYS,
    "train.max_loss_spike": ALWAYS,
    "train.report_to": ALWAYS,
    "train.group_by_length": ALWAYS,
    "train.batch_tokens": ALWAYS,
    "train.kernels": ALWAYS,
    "train.compile": ALWAYS,
    # without mlflow in report_to it is a recipe error of its own (_semantic_problems)
    "train.mlflow_uri": ALWAYS,
    # a single process has no collectives to time out, but a recipe cannot know its launch
    "train.ddp_timeout_s": ALWAYS,
    # strategies: impossible combinations are recipe errors of their own (_strategy_problems)
    "train.optimizer.lora_plus_ratio": ALWAYS,
    "train.optimizer.layer_decay": ALWAYS,
    "train.unfreeze": ALWAYS,
    "train.unfreeze.every_steps": ALWAYS,
    "train.unfreeze.start_layers": ALWAYS,
    "train.early_stopping": ALWAYS,
    "train.early_stopping.patience": ALWAYS,
    "train.early_stopping.min_delta": ALWAYS,
    # preference (task preference): a key its loss does not read is a recipe error of its own
    # that names the loss (_preference_problems); here the same rule for the to_yaml drop
    "preference": Applies(lambda r: r.task == "preference", "task preference"),
    "preference.loss": ALWAYS,
    **{
        f"preference.{k}": Applies(
            lambda r, kinds=kinds: r.task == "preference" and r.preference.loss in kinds,
            f"preference.loss {' and '.join(kinds)}",
        )
        for k, kinds in PREFERENCE_KEYS.items()
        if k != "lambda_"
    },
    # the field is lambda_ (a Python keyword otherwise); recipes write `lambda`, which
    # _preference_problems checks under that name; to_yaml writes it for orpo only
    "preference.lambda_": ALWAYS,
    # eval
    "eval": ALWAYS,
    "eval.batch_size": ALWAYS,
    # a preference run's answers: ftcli eval --baseline --judge (evaluation/preference.py)
    "eval.max_new_tokens": Applies(
        lambda r: r.task in ("causal_lm", "preference"), "task causal_lm or preference", warn=True
    ),
    "eval.generate_examples": Applies(
        lambda r: r.task in ("causal_lm", "preference"), "task causal_lm or preference", warn=True
    ),
    # wrong task or missing benchmarks: recipe errors of their own (_semantic_problems)
    "eval.benchmarks": ALWAYS,
    "eval.benchmarks_path": ALWAYS,
    "eval.benchmark_limit": ALWAYS,
    # tune: read by `ftcli tune` only (`ftcli train` runs the base recipe); its space is checked
    # before any trial (_tune_problems)
    "tune": ALWAYS,
    "tune.trials": ALWAYS,
    "tune.sampler": ALWAYS,
    "tune.metric": ALWAYS,
    "tune.pruner": ALWAYS,
    "tune.storage": ALWAYS,
    "tune.seed": ALWAYS,
    "tune.space": ALWAYS,
    # merge
    "merge": ALWAYS,
    "merge.enabled": Applies(
        lambda r: r.method.kind != "full",
        "lora and qlora (a full fine-tune has no adapter to merge)",
        warn=True,
    ),
    "merge.dtype": Applies(
        lambda r: r.method.kind != "full" and r.merge.enabled, "merge.enabled lora and qlora runs"
    ),
    "merge.into": Applies(
        lambda r: r.method.kind == "qlora" and r.merge.enabled, "merge.enabled qlora runs"
    ),
}


def _set_keys(model: BaseModel, prefix: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys the recipe set explicitly (defaults are never 'set', nor a null written
    where null is the default: a recipe.yaml ftcli wrote back has those)."""
    out = []
    for name in sorted(model.model_fields_set):
        value = getattr(model, name)
        if value is None and type(model).model_fields[name].default is None:
            continue
        out.append(".".join((*prefix, name)))
        if isinstance(value, BaseModel):
            out.extend(_set_keys(value, (*prefix, name)))
    return out


def _inapplicable(r: RecipeLike, already: set[str]) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for keys set where they do nothing; ``already`` keys are reported."""
    errors, warnings = [], []
    for key in _set_keys(r):
        rule = APPLIES.get(key)
        if rule is None or key in already or rule.when(r):
            continue
        if rule.warn:
            warnings.append(r.problem(key, f"only applies to {rule.where}; ignored in this run"))
        else:
            errors.append(
                r.problem(key, f"only applies to {rule.where}; it would do nothing", "remove it")
            )
    return errors, warnings


def drop_unapplied(d: dict, r: RecipeLike) -> None:
    """Remove from ``d`` (``r`` dumped to a mapping) every key that does nothing in ``r``."""
    for key, rule in APPLIES.items():
        if rule is not None and not rule.when(r):
            *parents, leaf = key.split(".")
            node = d
            for part in parents:
                node = node.get(part) or {}
            node.pop(leaf, None)
