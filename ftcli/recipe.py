"""The recipe: a strict, frozen schema and a loader that reports every problem at once.

``load_recipe(path, overrides)`` reads YAML with ``yaml.safe_load`` semantics, applies
``--set key=value`` overrides to the raw mapping, then validates. Each problem names the file, the
line, the dotted key and, where it can, the nearest valid key or value.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ftcli.errors import FtcliError, Problem, RecipeError

Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadSpec(_Section):
    """An MLP task head: Linear(hidden) -> GELU -> Dropout -> Linear(labels)."""

    hidden: int = Field(gt=0, description="width of the head's hidden layer")
    dropout: float = Field(0.1, ge=0, lt=1)


class ModelSpec(_Section):
    """Which pre-trained model to start from."""

    name: str = Field(description="hub id | local folder | file.gguf | pkg:PACKAGE/PATH")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weight dtype to load; auto = float32 (bf16 compute comes from mixed_precision)",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    head: HeadSpec | None = Field(
        None, description="classification: an MLP head instead of the linear one (issue 9)"
    )


class SplitSpec(_Section):
    validation: float = Field(0.1, ge=0, lt=1, description="fraction held out for validation loss")
    test: float = Field(0.1, ge=0, lt=1, description="fraction sealed for the final evaluation")
    seed: int = 0
    stratify: bool = Field(
        True, description="keep label proportions in every split (classification)"
    )


class CleanSpec(_Section):
    strip: bool = True
    drop_empty: bool = True
    dedupe: bool = True


# --- data.augment (issue 12): kept together; the ops live in data/augment.py, paraphrases in
# data/paraphrase.py.

AugmentOp = Literal["synonym", "swap", "delete", "insert", "typo"]


class ParaphraseSpec(_Section):
    model: str = Field(description="causal LM that writes the paraphrases: path, hub id or pkg:")
    max_new_tokens: int = Field(64, gt=0)
    filter_model: str | None = Field(
        None,
        description="classification: a trained classifier (run folder or model); copies it "
        "labels differently from their source are dropped",
    )


class AugmentSpec(_Section):
    """Augmented copies of the training split (validation and test are never augmented)."""

    copies: int = Field(1, gt=0, description="augmented copies per training example")
    ops: list[AugmentOp] = Field(
        ["synonym", "swap", "delete", "insert", "typo"],
        description="EDA-style ops and keyboard typos; each copy applies one, drawn per copy",
    )
    p: float = Field(0.1, gt=0, le=1, description="share of words each op touches")
    paraphrase: ParaphraseSpec | None = None
    seed: int = 0
    completions: bool = Field(
        False,
        description="causal_lm: also rewrite completions / assistant turns (default: prompts only)",
    )


class DataSpec(_Section):
    """Where the examples come from and how their columns map onto the task."""

    path: str = Field(description="hub dataset id | file | folder | glob | pkg:PACKAGE/PATH")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt", "folder", "yaml"] = (
        "auto"
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    hub_split: str = Field("train", description="which split of a hub dataset to read")
    text_column: str = "text"
    label_column: str | None = Field(
        None, description="default: label (a folder of <label>/*.txt files implies it)"
    )
    labels: list[str] | None = Field(None, description="keep only these labels, in this order")
    prompt_column: str | None = None
    completion_column: str | None = None
    instruction_column: str | None = None
    input_column: str | None = None
    output_column: str | None = None
    messages_column: str | None = None
    system_prompt: str | None = None
    split: SplitSpec = SplitSpec()
    validation_path: str | None = None
    test_path: str | None = None
    max_length: int = Field(128, gt=0, description="tokens per example; longer ones are truncated")
    max_train_examples: int | None = Field(None, gt=0)
    max_validation_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)
    clean: CleanSpec = CleanSpec()
    loss_on: Literal["completion", "all"] = Field(
        "completion", description="causal_lm: train on completion tokens only, or on every token"
    )
    add_eos: bool = Field(
        True, description="causal_lm: end every example with EOS so the model learns to stop"
    )
    encoding: str = Field(
        "utf-8",
        description="text encoding of local files; 'auto' detects it (charset-normalizer) and "
        "says what it chose; utf-8 files that fail to decode are detected too, and reported",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        if v != "auto":
            try:
                codecs.lookup(v)
            except (LookupError, ValueError):
                raise ValueError(
                    f"unknown text encoding {v[:40]!r}: use a Python codec name "
                    "(utf-8, latin-1, cp1252, utf-16...) or auto"
                ) from None
        return v

    @property
    def label_col(self) -> str:
        """The label column: ``label_column``, or ``label`` (what a ``<label>/*.txt`` folder has)."""
        return self.label_column or "label"

    augment: AugmentSpec | None = Field(None, description="augmented copies of the training split")
    packing: bool | None = Field(
        None,
        description="causal_lm: concatenate a micro-batch's examples into rows (no padding), "
        "attention isolated per example; default: on for causal_lm",
    )

    def packs(self, task: str, kind: str = "lora") -> bool:
        """Whether training packs examples: by default on for causal LMs, except with prompt-style
        methods (peft prepends virtual tokens to a 2D mask; a packed batch's mask is 4D)."""
        if self.packing is None:
            return task == "causal_lm" and kind not in PROMPT_KINDS
        return self.packing

    @property
    def style(self) -> str:
        """How a causal-LM example is laid out, derived from which columns are named."""
        if self.messages_column:
            return "chat"
        if self.instruction_column:
            return "instruction"
        if self.prompt_column or self.completion_column:
            return "completion"
        return "text"


class QuantSpec(_Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"


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


class MethodSpec(_Section):
    """How the model is adapted: full fine-tuning, LoRA (and variants), QLoRA, or another peft method."""

    kind: Literal["full", "lora", "qlora", "ia3", "prefix", "prompt", "ptuning", "vera"]
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(
        16.0, gt=0, description="LoRA scale numerator: the update is (alpha/r) B A"
    )
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt; None = peft's default for the architecture"
    )
    modules_to_save: list[str] | None = Field(
        None, description="extra modules trained in full and saved with the adapter"
    )
    init: Literal["gaussian", "kaiming", "pissa", "olora", "loftq", "eva"] = Field(
        "gaussian",
        description="LoRA init: gaussian/kaiming A with B zero (training starts at W0), or peft's "
        "pissa | olora | loftq (qlora) | eva (data-driven)",
    )
    quantization: QuantSpec | None = None
    # issue 9: the rest of the adaptation strategies
    dora: bool = Field(False, description="lora/qlora: weight-decomposed LoRA (peft use_dora)")
    rslora: bool = Field(False, description="lora/qlora: scale alpha/sqrt(r) instead of alpha/r")
    layers: list[int] | None = Field(
        None, description="only these transformer blocks are adapted (lora/ia3/vera) or trained"
    )
    freeze: list[str] | None = Field(
        None, description="full: parameter-name patterns (fnmatch or substring) that stay frozen"
    )
    num_virtual_tokens: int | None = Field(
        None, gt=0, description="prefix | prompt | ptuning: learned tokens (default 20)"
    )

    @property
    def virtual_tokens(self) -> int:
        return (self.num_virtual_tokens or 20) if self.kind in PROMPT_KINDS else 0

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    @property
    def quant(self) -> QuantSpec:
        return self.quantization or QuantSpec()

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


OptimizerName = Literal[
    "adamw", "adam", "sgd", "rmsprop", "adamw8bit", "paged_adamw", "paged_adamw8bit"
]


class OptimizerSpec(_Section):
    name: OptimizerName = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop")
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn this many times faster than A"
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="block i from the top gets lr * layer_decay**i"
    )


class SchedulerSpec(_Section):
    name: Literal["constant", "linear", "cosine", "plateau"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    factor: float = Field(0.5, gt=0, lt=1, description="plateau: multiply lr by this")
    patience: int = Field(1, ge=0, description="plateau: evaluations without improvement")


class UnfreezeSpec(_Section):
    """Gradual unfreezing: the head (plus start_layers top blocks) first, one more every N steps."""

    every_steps: int = Field(gt=0, description="optimizer steps between two unfreezings")
    start_layers: int = Field(1, ge=0, description="top blocks trainable from the start")


class EarlyStoppingSpec(_Section):
    """Stop when validation loss has not improved by min_delta for patience validations."""

    patience: int = Field(3, gt=0)
    min_delta: float = Field(0.0, ge=0)


class TrainSpec(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(
        None,
        ge=0,
        description="stop after this many optimizer steps; 0 = no training: the model is saved "
        "as it starts (base + untouched adapter/head), a control run for `ftcli eval --baseline`",
    )
    batch_size: int = Field(8, gt=0, description="micro-batch per process")
    gradient_accumulation: int = Field(1, gt=0)
    optimizer: OptimizerSpec = OptimizerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 where the hardware has it natively (a CUDA GPU with bf16, a CPU "
        "with AVX512-BF16 or AMX), else no",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        # YAML 1.1 reads a bare `no` (in a file or --set train.mixed_precision=no) as false
        return "no" if v is False else v

    gradient_checkpointing: bool = False
    group_by_length: bool = Field(
        True,
        description="micro-batches of similar lengths (shuffled mega-batches sorted by length): "
        "less padding, same examples per epoch",
    )
    batch_tokens: int | None = Field(
        None,
        gt=0,
        description="a token budget per micro-batch instead of batch_size examples (real tokens)",
    )
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger: Liger kernels on CUDA (pip install liger-kernel)"
    )
    compile: bool = Field(False, description="torch.compile the model (opt-in; first steps slower)")
    eval_every: int | None = Field(
        None, gt=0, description="validation loss every N steps; default: each epoch"
    )
    log_every: int = Field(10, gt=0)
    checkpoint_every: int | None = Field(
        None, gt=0, description="default: at the end of each epoch"
    )
    keep_checkpoints: int = Field(1, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="experiment trackers (accelerate's): tensorboard -> <run>/tb/, mlflow, wandb",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db",
    )
    ddp_timeout_s: int = Field(
        1800, gt=0, description="collective timeout of the process group (a hung rank fails after)"
    )
    max_loss_spike: float | None = Field(
        None,
        gt=1,
        description="stop when a logged loss exceeds this many times the lowest logged so far "
        "(NaN/Inf always stop)",
    )
    unfreeze: UnfreezeSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None


class EvalSpec(_Section):
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(
        64, gt=0, description="causal_lm: length bound for generated answers"
    )
    generate_examples: int = Field(
        64, ge=0, description="causal_lm: how many test examples to answer by generation"
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description="causal_lm: lm-eval tasks run after training, base vs fine-tuned (eval/benchmarks/)",
    )
    benchmarks_path: str | None = Field(
        None, description="folder of your own lm-eval task YAMLs for eval.benchmarks"
    )
    benchmark_limit: int | None = Field(
        None, gt=0, description="eval.benchmarks: score the first N documents of each task"
    )


class MergeSpec(_Section):
    enabled: bool = True
    dtype: Dtype = "float32"
    into: Literal["dequantized", "original"] = Field(
        "dequantized", description="qlora: fold into the NF4-dequantized weights the adapter saw"
    )


# --- tune (issue 12): the search `ftcli tune` runs (ftcli/tune.py); kept together.

SPACE_KINDS = ("choice", "uniform", "log_uniform", "int")


class TuneSpec(_Section):
    """A hyperparameter study on Optuna: each trial is the base recipe with ``space`` values set."""

    trials: int = Field(20, gt=0, description="trials this study should reach in all")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    metric: Literal["validation_loss", "accuracy", "macro_f1"] = Field(
        "validation_loss", description="selection metric, on the validation split only"
    )
    space: dict[str, dict[str, Any]] = Field(
        description="dotted recipe key (as --set takes it) -> {choice: [...]} | "
        "{uniform: [lo, hi]} | {log_uniform: [lo, hi]} | {int: [lo, hi]}"
    )
    pruner: Literal["none", "median", "hyperband"] = "median"
    storage: str | None = Field(
        None,
        description="Optuna storage URL, or a .log journal file; default: SQLite in the run folder",
    )
    seed: int = Field(0, description="the sampler's seed")


class Recipe(_Section):
    """A whole fine-tuning run. Frozen: nothing writes back into it."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run folder: <output_dir>/<name>"
    )
    task: Literal["classification", "causal_lm"]
    description: str | None = None
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    merge: MergeSpec = MergeSpec()
    tune: TuneSpec | None = None
    output_dir: str = "runs"

    _origin: RecipeOrigin | None = PrivateAttr(default=None)
    _warnings: list = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[Problem]:
        """Keys set that do nothing here, where a shared base recipe may set them on purpose."""
        return list(self._warnings)

    _notes: list[str] = PrivateAttr(default_factory=list)
    # dotted key -> (the relative path as written, the folder it was read from)
    _anchored: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """One-line notes from loading (keys a --set dropped); the CLI prints them."""
        return list(self._notes)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def problem(self, key: str, message: str, hint: str | None = None) -> Problem:
        """A Problem located at ``key`` in the file this recipe came from."""
        origin = self._origin
        if origin is None:
            return Problem(message, key=key, hint=hint)
        return origin.problem(key, message, hint)

    def to_yaml(self) -> str:
        """The resolved recipe, every default that applies written out, loadable by ``load_recipe``."""
        d = self.model_dump(mode="json")
        for key, kinds in METHOD_KEYS.items():  # the method's own keys: METHOD_KEYS owns them
            if self.method.kind not in kinds:
                d["method"].pop(key, None)
        if self.method.kind in PROMPT_KINDS:
            d["merge"].pop("enabled")  # nothing to fold: the pipeline skips the merge
        if self.method.kind == "qlora":
            d["method"]["quantization"] = self.method.quant.model_dump(mode="json")
        for key, rule in APPLIES.items():  # a key that does nothing here is not written
            if rule is not None and not rule.when(self):
                *parents, leaf = key.split(".")
                node = d
                for part in parents:
                    node = node.get(part) or {}
                node.pop(leaf, None)
        if self.data.augment is None:
            d["data"].pop("augment")
        if self.tune is None:
            d.pop("tune")
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- when each key applies

# Every key of the schema declares when it changes the run (tests/unit/test_recipe_applies.py walks
# the schema and fails for a key missing here). A key set in the recipe where its condition is
# false does nothing: that is an error, or a warning where a shared base recipe sets it on purpose.


@dataclass(frozen=True)
class Applies:
    """``when(recipe)`` is true where the key takes effect; ``where`` completes "only applies to"."""

    when: Callable[[Recipe], bool]
    where: str
    warn: bool = False  # a warning, not an error: a shared base recipe may set it for other runs


ALWAYS = None  # the key takes effect in every recipe that validates

_ADAM = ("adamw", "adam", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def _has_validation(r: Recipe) -> bool:
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
    "model.trust_remote_code": ALWAYS,
    "model.dtype": ALWAYS,
    "model.attn_implementation": ALWAYS,
    "model.head": ALWAYS,  # a causal LM with a head: a recipe error of its own
    "model.head.hidden": ALWAYS,
    "model.head.dropout": ALWAYS,
    # data
    "data": ALWAYS,
    "data.path": ALWAYS,
    "data.format": ALWAYS,
    "data.subset": ALWAYS,
    "data.hub_split": ALWAYS,
    "data.text_column": Applies(
        lambda r: r.task == "classification" or r.data.style == "text",
        "classification or plain-text causal_lm data",
        warn=True,
    ),
    "data.label_column": Applies(lambda r: r.task == "classification", "task classification"),
    "data.labels": Applies(lambda r: r.task == "classification", "task classification"),
    "data.prompt_column": Applies(lambda r: r.task == "causal_lm", "task causal_lm"),
    "data.completion_column": Applies(lambda r: r.task == "causal_lm", "task causal_lm"),
    "data.instruction_column": Applies(lambda r: r.task == "causal_lm", "task causal_lm"),
    "data.input_column": Applies(lambda r: r.data.style == "instruction", "instruction data"),
    "data.output_column": Applies(lambda r: r.data.style == "instruction", "instruction data"),
    "data.messages_column": Applies(lambda r: r.task == "causal_lm", "task causal_lm"),
    "data.system_prompt": Applies(
        lambda r: r.task == "causal_lm" and r.data.style in ("chat", "instruction"),
        "chat or instruction data",
    ),
    "data.split": ALWAYS,
    "data.split.validation": Applies(lambda r: not r.data.validation_path, "no validation_path"),
    "data.split.test": Applies(lambda r: not r.data.test_path, "no test_path"),
    "data.split.seed": ALWAYS,
    "data.split.stratify": Applies(
        lambda r: r.task == "classification", "task classification", warn=True
    ),
    "data.validation_path": ALWAYS,
    "data.test_path": ALWAYS,
    "data.max_length": ALWAYS,
    "data.max_train_examples": ALWAYS,
    "data.max_validation_examples": Applies(_has_validation, "a run with a validation split"),
    "data.max_test_examples": ALWAYS,
    "data.clean": ALWAYS,
    "data.clean.strip": ALWAYS,
    "data.clean.drop_empty": ALWAYS,
    "data.clean.dedupe": ALWAYS,
    "data.loss_on": Applies(lambda r: r.task == "causal_lm", "task causal_lm", warn=True),
    "data.add_eos": Applies(lambda r: r.task == "causal_lm", "task causal_lm", warn=True),
    "data.encoding": ALWAYS,
    # speed: packing on a classifier, liger on a CPU... are recipe errors of their own
    "data.packing": ALWAYS,
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
    "train.epochs": ALWAYS,
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
    # eval
    "eval": ALWAYS,
    "eval.batch_size": ALWAYS,
    "eval.max_new_tokens": Applies(lambda r: r.task == "causal_lm", "task causal_lm", warn=True),
    "eval.generate_examples": Applies(lambda r: r.task == "causal_lm", "task causal_lm", warn=True),
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
    """The dotted keys the recipe set explicitly (defaults are never 'set')."""
    out = []
    for name in sorted(model.model_fields_set):
        out.append(".".join((*prefix, name)))
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.extend(_set_keys(value, (*prefix, name)))
    return out


def _inapplicable(r: Recipe, already: set[str]) -> tuple[list[Problem], list[Problem]]:
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


# --------------------------------------------------------------------------- locating keys


class RecipeOrigin:
    """Maps dotted keys to the file and line they came from (or to the ``--set`` that set them)."""

    def __init__(
        self,
        file: str,
        lines: dict[tuple[str, ...], int],
        overridden: set[tuple[str, ...]],
        files: dict[tuple[str, ...], str] | None = None,
    ):
        self.file = file
        self.lines = lines
        self.overridden = overridden
        self.files = files or {}  # keys an ``extends:`` parent set -> its file

    def locate(self, path: tuple[str, ...]) -> tuple[str, int | None]:
        for i in range(len(path), 0, -1):
            if path[:i] in self.overridden:
                return "--set", None
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.files.get(path[:i], self.file), self.lines[path[:i]]
        return self.file, None

    def problem(self, key: str, message: str, hint: str | None = None) -> Problem:
        file, line = self.locate(tuple(key.split("."))) if key else (self.file, None)
        return Problem(message, key=key, file=file, line=line, hint=hint)


MAX_NODES = 20_000  # a recipe has a few hundred values; YAML aliases can make billions


def _check_size(root: yaml.Node, file: str) -> None:
    """Refuse a document that expands past MAX_NODES values (aliases of aliases: the
    "billion laughs" shape) before anything walks it."""
    seen, stack = 0, [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise RecipeError(
                [
                    Problem(
                        f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases "
                        "nested in aliases?)",
                        file=file,
                        hint="write the values out, or use fewer nested &anchors / *aliases",
                    )
                ]
            )
        if isinstance(node, yaml.MappingNode):
            stack.extend(v for kv in node.value for v in kv)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _node_lines(
    node: yaml.Node, prefix: tuple[str, ...], out: dict, problems: list[Problem], file: str
):
    """Record the line of every mapping key; flag duplicate keys, which safe_load would hide."""
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            dotted = ".".join((*prefix, key))
            if key in seen:
                problems.append(
                    Problem(
                        f"duplicate key (first set on line {seen[key]}); YAML would silently keep the last",
                        key=dotted,
                        file=file,
                        line=line,
                        hint="remove one of them",
                    )
                )
            seen[key] = line
            _node_lines(value_node, (*prefix, key), out, problems, file)
            out[(*prefix, key)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*prefix, str(i)), out, problems, file)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``train.optimizer.lr=1e-4`` -> (("train", "optimizer", "lr"), "1e-4" or a parsed YAML value)."""
    if "=" not in text:
        raise FtcliError(
            f"--set {text!r}: expected KEY=VALUE",
            hint="for example --set train.optimizer.lr=1.0e-4",
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*", key):
        raise FtcliError(
            f"--set {text!r}: {key!r} is not a dotted key", hint="for example method.r=16"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def apply_overrides(data: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> list[Problem]:
    problems = []
    for path, value in overrides:
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section",
                        key=".".join(path),
                        file="--set",
                    )
                )
                break
            node = child
        else:
            if value is None:  # --set key=null: back to the default (or gone)
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return problems


# --------------------------------------------------------------------------- did you mean

# Names people bring from other tools, mapped to ours (the key, relative to the same section).
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "warmup": "warmup_ratio",
    "model_name": "name",
    "base_model": "name",
    "method": "kind",
    "type": "kind",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "max_len": "max_length",
}


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _section_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = Recipe
    for part in path:
        if cls is None or part not in cls.model_fields:
            return None
        cls = _unwrap(cls.model_fields[part].annotation)
    return cls


def _all_keys(cls: type[BaseModel] = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    cls = cls or Recipe
    keys = []
    for name, field in cls.model_fields.items():
        keys.append((*prefix, name))
        sub = _unwrap(field.annotation)
        if sub is not None:
            keys.extend(_all_keys(sub, (*prefix, name)))
    return keys


def suggest_key(path: tuple[str, ...]) -> str | None:
    """The valid dotted key a misspelt or misplaced ``path`` most likely meant."""
    if not path:
        return None
    parent, leaf = path[:-1], path[-1]
    section = _section_at(parent)
    if section is not None:
        names = list(section.model_fields)
        alias = ALIASES.get(leaf.lower())
        if alias in names:
            return ".".join((*parent, alias))
        close = difflib.get_close_matches(leaf.lower(), names, n=1, cutoff=0.6)
        if close:
            return ".".join((*parent, close[0]))
    # A real key in another section (train.lr -> train.optimizer.lr)?
    wanted = {leaf, ALIASES.get(leaf.lower(), leaf)}
    elsewhere = [k for k in _all_keys() if k[-1] in wanted]
    if elsewhere:
        elsewhere.sort(key=lambda k: (0 if k[: len(parent)] == parent else 1, len(k)))
        return ".".join(elsewhere[0])
    return None


def _literal_choices(path: tuple[str, ...]) -> list[str]:
    if path and path[-1].isdigit():  # an item of a list of choices (train.report_to.0)
        path = path[:-1]
    section = _section_at(path[:-1])
    if section is None or path[-1] not in section.model_fields:
        return []
    choices: list[str] = []

    def walk(t: Any) -> None:
        if typing.get_origin(t) is Literal:
            choices.extend(str(a) for a in typing.get_args(t))
        for a in typing.get_args(t):
            walk(a)

    walk(section.model_fields[path[-1]].annotation)
    return choices


def _problem_from_error(err: dict, origin: RecipeOrigin) -> Problem:
    raw = tuple(str(p) for p in err["loc"])
    # pydantic adds the member type to loc for unions (e.g. 'list[str]'): keep only real keys
    loc = tuple(
        p for p in raw if not re.search(r"[\[\]'(]", p) and p not in {"str", "int", "float", "bool"}
    )
    if err["type"] == "extra_forbidden" and raw and loc[-1:] != raw[-1:]:
        loc = (*loc, raw[-1])  # the unknown key itself, whatever characters it holds ("(")
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        suggestion = suggest_key(loc)
        hint = f"did you mean {suggestion}?" if suggestion else None
        return origin.problem(key, "unknown key", hint)
    if kind == "missing":
        choices = _literal_choices(loc)
        hint = f"one of: {', '.join(choices)}" if choices else None
        return origin.problem(key, "required key is missing", hint)
    if kind in {"literal_error", "enum"}:
        choices = _literal_choices(loc)
        got = err.get("input")
        return origin.problem(
            key, f"{got!r} is not one of: {', '.join(choices)}", _did_you_mean(got, choices)
        )
    if kind == "model_type" and _section_at(loc) is not None:
        return _section_given_a_value(loc, err.get("input"), origin)
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = err.get("input")
    if not isinstance(got, dict | list) and got is not None:
        shown = repr(got)
        message = f"{message} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return origin.problem(key, message[0].lower() + message[1:])


def _did_you_mean(got: Any, choices: list[str]) -> str | None:
    """The choice ``got`` most likely meant, compared case-insensitively (``LoRA`` -> ``lora``)."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(got).lower(), list(lower), n=1, cutoff=0.5)
    return f"did you mean {lower[close[0]]!r}?" if close else None


def _section_given_a_value(loc: tuple[str, ...], got: Any, origin: RecipeOrigin) -> Problem:
    """``--set method=lora``: a section set to a plain value; point at the key that takes it."""
    section = _section_at(loc)
    key = ".".join(loc)
    fields = list(section.model_fields)
    target = next(
        (f for f in fields if str(got).lower() in map(str.lower, _literal_choices((*loc, f)))),
        None,
    )
    hint = (
        f"did you mean {key}.{target}={got}?"
        if target
        else f"set one of its keys, e.g. {key}.{fields[0]}"
    )
    return origin.problem(key, f"is a section ({', '.join(fields[:4])}, ...), not a value", hint)


# --------------------------------------------------------------------------- semantic checks


def _semantic_problems(r: Recipe) -> list[Problem]:
    """Combinations that type-check but make no sense. Each names the key to change."""
    p = []
    m, d, t = r.method, r.data, r.train
    p += _strategy_problems(r)
    if m.quantization is not None and m.kind != "qlora":
        p.append(
            r.problem(
                "method.quantization",
                "only applies to method.kind 'qlora'",
                "remove it, or set method.kind to qlora",
            )
        )
    if (
        m.kind == "qlora"
        and t.device == "cuda"
        and m.quant.compute_dtype == "float32"
        and m.quant.bits == 4
    ):
        p.append(
            r.problem(
                "method.quantization.compute_dtype",
                "float32 compute on CUDA throws away QLoRA's speed and memory gains",
                "use bfloat16 (or float16 on GPUs without bf16)",
            )
        )
    if m.kind == "qlora" and m.quant.bits == 8 and "quant_type" in m.quant.model_fields_set:
        p.append(r.problem("method.quantization.quant_type", "only applies to 4-bit quantization"))
    if d.packing and r.task != "causal_lm":
        p.append(
            r.problem(
                "data.packing",
                "packing only applies to task causal_lm",
                "remove it (classification batches are length-grouped already)",
            )
        )
    if d.packing and m.kind in PROMPT_KINDS:
        p.append(
            r.problem(
                "data.packing",
                f"{m.kind} tuning prepends virtual tokens to each row's mask, which a packed "
                "batch's per-example mask cannot take",
                "remove it: batches are length-grouped instead",
            )
        )
    if t.batch_tokens is not None and t.batch_tokens < d.max_length:
        p.append(
            r.problem(
                "train.batch_tokens",
                f"{t.batch_tokens} is below data.max_length ({d.max_length}): a long example "
                "would not fit a micro-batch",
                f"set train.batch_tokens to at least {d.max_length}",
            )
        )
    if t.kernels == "liger" and t.device == "cpu":
        p.append(
            r.problem("train.kernels", "Liger kernels need a CUDA GPU", "set train.kernels to none")
        )
    if t.mixed_precision == "fp16" and t.device == "cpu":
        p.append(
            r.problem(
                "train.mixed_precision",
                "fp16 mixed precision needs a CUDA GPU",
                "use bf16 or no on the CPU",
            )
        )
    if d.split.validation + d.split.test >= 0.9:
        p.append(
            r.problem(
                "data.split",
                f"validation + test = {d.split.validation + d.split.test:g} "
                "leaves too little to train on",
                "keep the two under 0.9 together",
            )
        )
    if r.task == "classification":
        for key in (
            "prompt_column",
            "completion_column",
            "instruction_column",
            "input_column",
            "output_column",
            "messages_column",
            "system_prompt",
        ):
            if getattr(d, key):
                p.append(r.problem(f"data.{key}", "only applies to task causal_lm"))
    else:
        if d.label_column or d.labels:
            key = "data.label_column" if d.label_column else "data.labels"
            p.append(
                r.problem(
                    key,
                    "only applies to task classification",
                    "for causal_lm name the text, prompt/completion, instruction or messages columns",
                )
            )
        styles = [
            s
            for s, cols in {
                "messages_column": [d.messages_column],
                "instruction_column": [d.instruction_column],
                "prompt_column": [d.prompt_column, d.completion_column],
            }.items()
            if any(cols)
        ]
        if len(styles) > 1:
            p.append(
                r.problem(
                    f"data.{styles[1]}",
                    f"conflicts with data.{styles[0]}: name one layout",
                    "chat (messages_column), instruction, or prompt/completion",
                )
            )
        if bool(d.prompt_column) != bool(d.completion_column):
            missing = "completion_column" if d.prompt_column else "prompt_column"
            p.append(
                r.problem(f"data.{missing}", "prompt_column and completion_column go together")
            )
        if d.instruction_column and not d.output_column:
            p.append(
                r.problem("data.output_column", "an instruction layout needs the answer's column")
            )
        if d.system_prompt and d.style not in ("chat", "instruction"):
            p.append(r.problem("data.system_prompt", "only applies to chat or instruction data"))
    if d.validation_path and "validation" in d.split.model_fields_set:
        p.append(r.problem("data.split.validation", "conflicts with data.validation_path: set one"))
    if d.test_path and "test" in d.split.model_fields_set:
        p.append(r.problem("data.split.test", "conflicts with data.test_path: set one"))
    if t.scheduler.name == "plateau" and "warmup_ratio" in t.scheduler.model_fields_set:
        p.append(r.problem("train.scheduler.warmup_ratio", "the plateau scheduler has no warmup"))
    p += _tracking_problems(r)
    e = r.eval
    if e.benchmarks and r.task != "causal_lm":
        p.append(
            r.problem(
                "eval.benchmarks",
                "benchmarks need a causal language model; this recipe trains a classifier",
                "compare classifiers with `ftcli eval RUN --baseline probe --baseline tfidf`",
            )
        )
    for key in ("benchmarks_path", "benchmark_limit"):
        if getattr(e, key) is not None and not e.benchmarks:
            p.append(r.problem(f"eval.{key}", "only applies with eval.benchmarks"))
    p += _augment_problems(r) + _tune_problems(r)
    return p


def _tracking_problems(r: Recipe) -> list[Problem]:
    """train.report_to: each tracker once, its package installed; mlflow_uri only with mlflow."""
    import importlib.util

    t, p = r.train, []
    if len(set(t.report_to)) != len(t.report_to):
        p.append(r.problem("train.report_to", "names a tracker twice", "list each once"))
    for name in dict.fromkeys(t.report_to):
        if importlib.util.find_spec(name) is None:
            p.append(
                r.problem(
                    "train.report_to",
                    f"{name} is not installed",
                    "pip install wandb"
                    if name == "wandb"
                    else f"pip install ftcli[tracking] (or pip install {name})",
                )
            )
    if t.mlflow_uri and "mlflow" not in t.report_to:
        p.append(
            r.problem("train.mlflow_uri", "only applies with mlflow in train.report_to", "add it")
        )
    return p


def _kinds_text(kinds: tuple[str, ...]) -> str:
    return " and ".join(kinds) if len(kinds) <= 2 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"


def _strategy_problems(r: Recipe) -> list[Problem]:
    """Adaptation-strategy combinations that would do nothing (issue 9)."""
    p = []
    m, t, o = r.method, r.train, r.train.optimizer
    for key, kinds in METHOD_KEYS.items():
        if key in m.model_fields_set and m.kind not in kinds:
            p.append(
                r.problem(
                    f"method.{key}",
                    f"only applies to {_kinds_text(kinds)}, not to method.kind '{m.kind}'",
                    f"remove it, or set method.kind to {kinds[0]}",
                )
            )
    if m.init == "loftq" and m.kind == "lora":
        p.append(
            r.problem(
                "method.init",
                "loftq initialises LoRA to offset the quantization error of a 4-bit base: "
                "it only applies to method.kind 'qlora'",
                "set method.kind to qlora, or use init pissa/olora",
            )
        )
    if m.init == "loftq" and m.kind == "qlora" and m.quant.bits != 4:
        p.append(r.problem("method.init", "loftq needs 4-bit quantization"))
    if m.kind == "qlora" and m.init in ("pissa", "olora"):
        p.append(
            r.problem(
                "method.init",
                f"{m.init} rewrites the base weights it starts from, which a 4-bit base cannot hold",
                "use method.kind lora, or init loftq for a quantized base",
            )
        )
    if m.dora and m.init in ("pissa", "olora", "loftq", "eva"):
        p.append(r.problem("method.dora", f"peft cannot combine DoRA with init {m.init}"))
    if m.layers is not None:
        if not m.layers:
            p.append(r.problem("method.layers", "must name at least one block"))
        if any(i < 0 for i in m.layers):
            p.append(r.problem("method.layers", "block numbers start at 0"))
        if len(set(m.layers)) != len(m.layers):
            p.append(r.problem("method.layers", "names a block twice"))
    if m.freeze is not None and not m.freeze:
        p.append(r.problem("method.freeze", "must name at least one parameter pattern"))
    if r.model.head is not None and r.task != "classification":
        p.append(
            r.problem(
                "model.head", "only applies to task classification (a causal LM keeps its lm_head)"
            )
        )
    if m.kind in PROMPT_KINDS and "enabled" in r.merge.model_fields_set and r.merge.enabled:
        p.append(
            r.problem(
                "merge.enabled",
                f"method.kind '{m.kind}' learns virtual tokens: there are no weights to fold",
                "remove it (the adapter is used as it is: ftcli predict RUN)",
            )
        )
    if o.lora_plus_ratio is not None and m.kind not in LORA_KINDS:
        p.append(
            r.problem(
                "train.optimizer.lora_plus_ratio",
                f"only applies to lora and qlora (LoRA+ speeds up the B matrices), not to "
                f"method.kind '{m.kind}'",
                "remove it, or set method.kind to lora",
            )
        )
    if o.layer_decay is not None and m.kind in PROMPT_KINDS:
        p.append(
            r.problem(
                "train.optimizer.layer_decay",
                f"method.kind '{m.kind}' trains no transformer blocks, so there is no per-block rate",
                "remove it, or choose full, lora, qlora, ia3 or vera",
            )
        )
    if t.unfreeze is not None:
        if m.kind in PROMPT_KINDS:
            p.append(
                r.problem(
                    "train.unfreeze",
                    f"gradual unfreezing needs transformer blocks to unfreeze; method.kind "
                    f"'{m.kind}' trains only virtual tokens",
                    "remove it, or choose full, lora, qlora, ia3 or vera",
                )
            )
        elif t.unfreeze.start_layers == 0 and r.task != "classification":
            p.append(
                r.problem(
                    "train.unfreeze.start_layers",
                    "a causal LM has no task head to train alone: start with at least one block",
                    "set start_layers to 1 or more",
                )
            )
    if t.early_stopping is not None and not r.data.validation_path and not r.data.split.validation:
        p.append(
            r.problem(
                "train.early_stopping",
                "early stopping watches validation loss, but there is no validation split",
                "set data.split.validation above 0, or data.validation_path",
            )
        )
    return p


# --- data.augment and tune checks (issue 12)


def _augment_problems(r: Recipe) -> list[Problem]:
    a = r.data.augment
    if a is None:
        return []
    p = []
    if not a.ops and a.paraphrase is None:
        p.append(
            r.problem(
                "data.augment.ops",
                "no op and no paraphrase: augmentation would add nothing",
                "name ops (synonym, swap, delete, insert, typo) or a paraphrase model",
            )
        )
    if r.task == "causal_lm" and r.data.style == "text" and not a.completions:
        p.append(
            r.problem(
                "data.augment",
                "plain-text data has no prompt to rewrite, and completions are never rewritten "
                "unless asked",
                "set data.augment.completions: true to rewrite the text itself",
            )
        )
    if a.completions and r.task == "classification":
        p.append(r.problem("data.augment.completions", "only applies to task causal_lm"))
    if a.paraphrase and a.paraphrase.filter_model and r.task != "classification":
        p.append(
            r.problem("data.augment.paraphrase.filter_model", "only applies to task classification")
        )
    return p


def space_values(spec: dict) -> tuple[str, list]:
    """(kind, the values that bound it) of one ``tune.space`` entry: every choice, or lo and hi."""
    kind = next(iter(spec))
    values = spec[kind]
    return kind, list(values) if isinstance(values, list) else [values]


def _tune_problems(r: Recipe) -> list[Problem]:
    """A space that could produce an invalid recipe is reported now, before any trial runs: every
    choice and both bounds go through the same override path as ``--set``."""
    tune = r.tune
    if tune is None:
        return []
    origin = r._origin

    def at(key: str, message: str, hint: str | None = None) -> Problem:
        path = ("tune", "space", key)
        if origin is None:
            return Problem(message, key=".".join(path), hint=hint)
        line = origin.lines.get(path) or origin.lines.get(path[:2])
        return Problem(message, key=".".join(path), file=origin.file, line=line, hint=hint)

    p = []
    if not tune.space:
        p.append(r.problem("tune.space", "the search space is empty", "name at least one key"))
    base = yaml.safe_load(r.to_yaml())
    base.pop("tune", None)
    for key, spec in tune.space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            p.append(
                at(
                    key,
                    f"expected one of {{{': ..., '.join(SPACE_KINDS)}: ...}}, got {spec!r}",
                    "e.g. {choice: [4, 8, 16]} or {log_uniform: [1.0e-5, 1.0e-2]}",
                )
            )
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*", key):
            p.append(at(key, "not a dotted recipe key", "for example method.r"))
            continue
        if key.split(".")[0] in ("tune", "name", "output_dir"):
            p.append(at(key, "the study itself sets this key; it cannot be searched"))
            continue
        kind, values = space_values(spec)
        if kind == "choice":
            if not values:
                p.append(at(key, "empty choice: nothing to pick from", "list at least one value"))
                continue
        else:
            nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if len(values) != 2 or len(nums) != 2:
                p.append(at(key, f"{kind} takes [low, high] numbers, got {values!r}"))
                continue
            lo, hi = values
            if lo > hi:
                p.append(at(key, f"low {lo!r} > high {hi!r}", "swap the bounds"))
                continue
            if kind == "log_uniform" and lo <= 0:
                p.append(at(key, f"log_uniform needs low > 0, got {lo!r}"))
                continue
            if kind == "int" and not all(isinstance(v, int) for v in values):
                p.append(at(key, f"int takes whole-number bounds, got {values!r}"))
                continue
            if tune.sampler == "grid":
                p.append(
                    at(
                        key,
                        "the grid sampler needs a finite space",
                        "use {choice: [...]} for every key, or sampler tpe/random",
                    )
                )
                continue
        for value in values:
            data = yaml.safe_load(yaml.safe_dump(base))
            apply_overrides(data, [(tuple(key.split(".")), value)])
            try:
                recipe_from_mapping(data, file="<trial>")
            except RecipeError as exc:
                inner = exc.problems[0]
                where = f"{inner.key}: " if inner.key and inner.key != key else ""
                p.append(
                    at(
                        key,
                        f"the value {value!r} makes an invalid recipe: {where}{inner.message}",
                        inner.hint,
                    )
                )
                break
    if tune.metric != "validation_loss" and r.task != "classification":
        p.append(
            r.problem(
                "tune.metric", f"{tune.metric} needs task classification", "use validation_loss"
            )
        )
    if r.data.split.validation <= 0 and not r.data.validation_path:
        p.append(
            r.problem(
                "tune",
                "a study selects on the validation split, and this recipe has none",
                "set data.split.validation above 0 (the test split stays sealed)",
            )
        )
    return p


# --------------------------------------------------------------------------- loading


def _is_float_string(value: Any) -> bool:
    return isinstance(value, str) and bool(
        re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value)
    )


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; users mean a number (TRAPS.md #6)."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    return float(node) if _is_float_string(node) else node


def recipe_from_mapping(
    data: Any, file: str = "<recipe>", lines=None, overridden=None, files=None
) -> Recipe:
    """Validate a mapping (already YAML-parsed) into a Recipe, or raise RecipeError listing every
    problem. ``files``: keys that came from another file (an ``extends:`` parent) -> that file."""
    origin = RecipeOrigin(file, lines or {}, overridden or set(), files)
    if not isinstance(data, dict):
        raise RecipeError(
            [Problem("a recipe is a mapping of keys (name:, task:, model: ...)", file=file, line=1)]
        )
    try:
        recipe = Recipe.model_validate(_fix_yaml_floats(data))
    except ValidationError as exc:
        problems = [_problem_from_error(e, origin) for e in exc.errors()]
        raise RecipeError(_dedupe(problems)) from None
    recipe._origin = origin
    problems = _semantic_problems(recipe)
    errors, recipe._warnings = _inapplicable(recipe, {p.key for p in problems})
    problems += errors
    if problems:
        raise RecipeError(problems)
    return recipe


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p.render() not in seen:
            seen.add(p.render())
            out.append(p)
    return out


def _read_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int], list[Problem]]:
    """One file's mapping, the line of each key, and its duplicate-key problems."""
    text = path.read_text(encoding="utf-8")
    file = str(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_size(node, file)
        data = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(
            [Problem("not valid YAML: nested too deeply", file=file, hint="flatten it")]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            [Problem(f"not valid YAML: {reason}", file=file, line=mark.line + 1 if mark else None)]
        ) from None
    lines: dict[tuple[str, ...], int] = {}
    problems: list[Problem] = []
    if node is not None:
        _node_lines(node, (), lines, problems, file)
    return ({} if data is None else data), lines, problems


def _deep_merge(base: dict, over: dict, where: dict, own: dict, prefix: tuple = ()) -> dict:
    """``over`` on top of ``base``: mappings merge, lists and scalars replace, None removes.
    ``where`` (dotted key -> (file, line)) is updated to say where each surviving value came from."""
    out = dict(base)
    for key, value in over.items():
        path = (*prefix, str(key))
        if value is None:
            out.pop(key, None)
            for k in [k for k in where if k[: len(path)] == path]:
                del where[k]
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            where[path] = own[path]
            out[key] = _deep_merge(out[key], value, where, own, path)
            continue
        for k in [k for k in where if k[: len(path)] == path]:
            del where[k]
        for k, loc in own.items():
            if k[: len(path)] == path:
                where[k] = loc
        out[key] = value
    return out


def _find_parent(name: Any, child: Path) -> Path | None:
    if not isinstance(name, str) or not name.strip():
        return None
    near = child.parent / name
    if near.is_file():
        return near
    bundled = resolve_recipe_path(name)
    return bundled if bundled.is_file() else None


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict | Any, dict, list]:
    """A recipe with its ``extends:`` chain resolved: (flat mapping, key -> (file, line), problems)."""
    data, lines, problems = _read_yaml(path)
    file = str(path)
    own = {k: (file, line) for k, line in lines.items()}
    if not isinstance(data, dict) or "extends" not in data:
        return data, own, problems
    parent_name = data.pop("extends")
    at = lines.get(("extends",))
    parent = _find_parent(parent_name, path)
    if parent is None:
        raise RecipeError(
            [
                *problems,
                Problem(
                    f"cannot find the recipe {parent_name!r} (a path relative to this recipe, or a "
                    "bundled recipe's name)",
                    key="extends",
                    file=file,
                    line=at,
                    hint="`ftcli recipes` lists the bundled ones",
                ),
            ]
        )
    seen = (*chain, path.resolve())
    if parent.resolve() in seen:
        names = " -> ".join(str(p) for p in (*seen, parent.resolve()))
        raise RecipeError(
            [
                *problems,
                Problem(f"extends forms a cycle: {names}", key="extends", file=file, line=at),
            ]
        )
    base, where, parent_problems = _load_layers(parent, seen)
    if not isinstance(base, dict):
        raise RecipeError(
            [Problem(f"{parent} is not a recipe mapping", key="extends", file=file, line=at)]
        )
    own.pop(("extends",), None)
    where = dict(where)
    where[()] = (file, lines.get((), 1))
    return _deep_merge(base, data, where, own), where, parent_problems + problems


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read (with its ``extends:`` chain), override and validate a recipe file. Raises
    FtcliError/RecipeError for the user."""
    path = Path(path)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        path = path / "recipe.yaml"  # a run folder: its resolved recipe
    if not path.is_file():
        names = {p.stem.lower(): p.stem for p in bundled_recipes_dir().glob("*.yaml")}
        close = difflib.get_close_matches(path.stem.lower(), list(names), n=1, cutoff=0.6)
        raise FtcliError(
            f"recipe not found: {path}",
            hint=(f"did you mean {names[close[0]]}? " if close else "")
            + "give a YAML file path; `ftcli recipes` lists the bundled ones",
        )
    file = str(path)
    data, where, problems = _load_layers(path)
    parsed = [parse_override(o) for o in overrides]
    notes: list[str] = []
    if isinstance(data, dict):
        anchored = anchor_paths(data, path.parent)
        problems += apply_overrides(data, parsed)
        for k in {".".join(p) for p, _ in parsed}:
            anchored.pop(k, None)
        anchored.update(anchor_paths(data, Path.cwd(), {p for p, _ in parsed}))
        notes += drop_inapplicable(data, parsed)
        labels_as_strings(data)
    lines = {k: line for k, (_, line) in where.items()}
    files = {k: f for k, (f, _) in where.items() if f != file}
    try:
        recipe = recipe_from_mapping(data, file, lines, {p for p, _ in parsed}, files)
    except RecipeError as exc:
        found = problems + exc.problems
        found.sort(key=lambda q: (q.file == "--set", q.file != file, q.line or 0))
        err = RecipeError(found)
        err.partial = data_part(data, file, lines, {p for p, _ in parsed})
        if err.partial is not None:
            err.partial._anchored = anchored
        raise err from None
    if problems:
        raise RecipeError(problems)
    recipe._notes = notes
    recipe._anchored = anchored if isinstance(data, dict) else {}
    return recipe


# --------------------------------------------------------------------------- what a new user writes

PATH_KEYS = (
    ("data", "path"),
    ("data", "validation_path"),
    ("data", "test_path"),
    ("model", "name"),
)
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "init")


def anchor_paths(
    data: dict, base: Path, only: set[tuple[str, ...]] | None = None
) -> dict[str, tuple[str, str]]:
    """Make the recipe's relative local paths absolute, from ``base`` (the recipe's folder for keys in
    the file, the working directory for ``--set`` ones), so a run repeats from anywhere. A hub id or
    a ``pkg:`` spec is left alone: a relative value is a path when it exists under ``base`` or looks
    like one (``./x``, ``x.csv``, a glob)."""
    from ftcli.sources import PKG, looks_local

    done = {}
    for key in PATH_KEYS:
        if only is not None and key not in only:
            continue
        section = data.get(key[0])
        value = section.get(key[1]) if isinstance(section, dict) else None
        if not isinstance(value, str) or not value or value.startswith(PKG):
            continue
        if value.startswith("~") or Path(value).is_absolute():
            continue
        here = base.absolute() / value
        if here.exists() or glob.glob(str(here)) or looks_local(value):
            section[key[1]] = os.path.normpath(here)
            done[".".join(key)] = (value, str(base.absolute()))
    return done


def drop_inapplicable(data: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> list[str]:
    """``--set method.kind=full`` on a LoRA recipe: drop the file's LoRA (and quantization) keys, with
    a note. Keys given with ``--set`` stay, so an explicit inapplicable value is still an error."""
    kind = next((v for p, v in reversed(overrides) if p == ("method", "kind")), None)
    method = data.get("method")
    if not isinstance(kind, str) or not isinstance(method, dict):
        return []
    gone = (*LORA_KEYS, "quantization") if kind == "full" else ("quantization",)
    if kind == "qlora":
        gone = ()
    explicit = {p[1] for p, _ in overrides if len(p) > 1 and p[0] == "method"}
    dropped = [k for k in gone if k in method and k not in explicit]
    for k in dropped:
        method.pop(k)
    if not dropped:
        return []
    return [
        f"--set method.kind={kind}: dropped "
        + ", ".join(f"method.{k}" for k in dropped)
        + f" (no meaning for {kind})"
    ]


def data_part(data: Any, file: str, lines, overridden) -> Recipe | None:
    """The task and data sections alone, when they are valid although the rest is not: enough for
    ``validate`` to check the data in the same report (a method typo must not hide a bad column)."""
    if not isinstance(data, dict):
        return None
    try:
        d = DataSpec.model_validate(_fix_yaml_floats(data.get("data")))
        task = Recipe.model_fields["task"].annotation
        if data.get("task") not in typing.get_args(task):
            return None
    except ValidationError:
        return None
    part = Recipe.model_construct(task=data["task"], data=d)
    part._origin = RecipeOrigin(file, lines or {}, overridden or set())
    return part


def labels_as_strings(data: dict) -> None:
    """``labels: [0, 1, 2]``: YAML reads numbers, the data's labels are read as text ("0", "1")."""
    d = data.get("data")
    labels = d.get("labels") if isinstance(d, dict) else None
    if isinstance(labels, list):
        d["labels"] = [
            str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in labels
        ]


def bundled_recipes_dir() -> Path:
    """The bundled recipes' folder, inside the package (ftcli/bundled/recipes/)."""
    from ftcli.bundled import recipes_dir

    return recipes_dir()


def resolve_recipe_path(name: str) -> Path:
    """A path as given, or the name of a bundled recipe (``quickstart`` -> recipes/quickstart.yaml)."""
    from ftcli.bundled import recipe_path

    p = Path(name)
    if p.exists():
        return p
    return recipe_path(name) or p
