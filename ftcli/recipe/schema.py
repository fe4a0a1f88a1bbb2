"""The recipe's schema: strict, frozen pydantic models, one per section, and ``Recipe`` itself.

``Recipe.to_yaml`` writes the resolved recipe without the keys that do nothing in it, which
``applies.py`` decides; that module names no class of this one, so the import points one way.
Where each key came from is ``origin.py``'s; validating a mapping into a Recipe is ``load.py``'s.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ftcli.errors import Problem
from ftcli.recipe.applies import METHOD_KEYS, PREFERENCE_KEYS, PROMPT_KINDS, drop_unapplied
from ftcli.recipe.origin import RecipeOrigin

Dtype = Literal["float32", "bfloat16", "float16"]


def _numeric(annotation: Any) -> bool:
    """Whether a field takes numbers only (int, float, optional or in a list/tuple): no bool."""
    if annotation in (int, float):
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    return bool(args) and typing.get_origin(annotation) is not Literal and all(map(_numeric, args))


def _has_bool(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return any(map(_has_bool, value))
    return isinstance(value, bool)


class _Section(BaseModel):
    # inf and nan pass every bound (nan compares false) and fail later, inside training
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        """YAML reads true/yes/on as a boolean, which pydantic would take as the number 1."""
        if _has_bool(v) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(
                "expects a number, not true/false (YAML reads yes/no/on/off/true/false as booleans)"
            )
        return v


class HeadSpec(_Section):
    """An MLP task head: Linear(hidden) -> GELU -> Dropout -> Linear(labels)."""

    hidden: int = Field(gt=0, description="width of the head's hidden layer")
    dropout: float = Field(0.1, ge=0, lt=1)


class AddedTokenSpec(_Section):
    """One token ``model.add_tokens`` adds, written as a mapping to say whether it is special."""

    content: str = Field(min_length=1, description="the token's text, e.g. <|tool|>")
    special: bool = Field(
        False,
        description="a special token (a turn marker): never split or normalised, and dropped "
        "by decode(skip_special_tokens=True)",
    )


class ModelSpec(_Section):
    """Which pre-trained model to start from."""

    name: str = Field(description="hub id | local folder | file.gguf | pkg:PACKAGE/PATH")
    revision: str | None = None
    add_tokens: list[str | AddedTokenSpec] | None = Field(
        None,
        description="tokens the tokenizer gains (a string, or {content: ..., special: true}); "
        "the embeddings (and an untied output head) grow by their rows, initialised to the mean "
        "embedding and trained; a token already in the vocabulary is warned about, not added",
    )

    @field_validator("add_tokens")
    @classmethod
    def _distinct_tokens(cls, v: Any) -> Any:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one token (or leave add_tokens out)")
        seen: set[str] = set()
        for entry in v:
            text = entry if isinstance(entry, str) else entry.content
            if not text.strip():
                raise ValueError("a token cannot be empty or only whitespace")
            if text in seen:
                raise ValueError(f"lists the token {text!r} twice")
            seen.add(text)
        return v

    @property
    def added_tokens(self) -> list[AddedTokenSpec]:
        """``add_tokens`` with every entry as a mapping (a plain string: a normal token)."""
        return [
            AddedTokenSpec(content=t) if isinstance(t, str) else t for t in self.add_tokens or []
        ]

    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weight dtype to load; auto = bf16 on a bf16 CUDA GPU computing in bf16 "
        "(LoRA-style methods; what trains stays float32), float32 elsewhere and for full",
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


class SourceSpec(_Section):
    """One dataset of a mixture: where it is, its own columns and layout, and its share."""

    path: str = Field(description="hub dataset id | file | folder | glob | pkg:PACKAGE/PATH")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="what eval and data.json call it; default: from its path (made unique)",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="its share of the training split (relative to the other weights); every "
        "source has one, or none does",
    )
    max_examples: int | None = Field(
        None,
        gt=0,
        description="at most this many of its examples in the training split (a seeded "
        "sample); only without weights",
    )
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt", "folder", "yaml"] = (
        "auto"
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    hub_split: str = Field("train", description="which split of a hub dataset to read")
    text_column: str = "text"
    label_column: str | None = Field(
        None, description="default: label (a folder of <label>/*.txt files implies it)"
    )
    prompt_column: str | None = None
    completion_column: str | None = None
    instruction_column: str | None = None
    input_column: str | None = None
    output_column: str | None = None
    messages_column: str | None = None
    system_prompt: str | None = None

    @property
    def style(self) -> str:
        """How its causal-LM examples are laid out (as ``DataSpec.style``)."""
        return _style(self)


def _derived_name(path: str) -> str:
    """A source's default name: its file or dataset name without suffixes (``data/chat.jsonl`` ->
    ``chat``, ``org/ultrachat_200k`` -> ``ultrachat_200k``), in the name's characters."""
    base = path.rstrip("/").replace("\\", "/").split("/")[-1].split(":")[-1]
    base = base.split(".")[0] if not base.startswith(".") else base
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")
    return base or "source"


def source_names(sources: list[SourceSpec]) -> list[str]:
    """Each source's name: its own, else derived from its path, made unique with -2, -3..."""
    taken = {s.name for s in sources if s.name}
    out = []
    for s in sources:
        if s.name:
            out.append(s.name)
            continue
        base = _derived_name(s.path)
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        out.append(name)
    return out


def _style(spec: Any) -> str:
    if spec.messages_column:
        return "chat"
    if spec.instruction_column:
        return "instruction"
    if spec.prompt_column or spec.completion_column:
        return "completion"
    return "text"


# the keys a data.sources entry reads for itself (where it is, how its columns map), which a
# one-source data section holds too: the entry's fields but its mixture-only ones
SOURCE_KEYS = tuple(
    k for k in SourceSpec.model_fields if k not in ("name", "weight", "max_examples")
)


# The chat templates ftcli ships (ftcli/bundled/templates/NAME.jinja), for data.chat_template.
CHAT_TEMPLATES = ("chatml", "llama-3", "mistral", "gemma", "qwen", "plain")
# The parts of an assistant turn data.train_on can make targets (all of them by default).
TRAIN_ON = ("answers", "reasoning", "tool_calls")


class DataSpec(_Section):
    """Where the examples come from and how their columns map onto the task."""

    path: str | None = Field(
        None,
        description="hub dataset id | file | folder | glob | pkg:PACKAGE/PATH (one source; "
        "required unless data.sources names several)",
    )
    sources: list[SourceSpec] | None = Field(
        None,
        description="a mixture: several datasets, each with its own path, columns and layout, "
        "split separately, the training split sampled by weight (instead of data.path and its "
        "column keys)",
    )
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
    chosen_column: str = Field(
        "chosen",
        description="preference | reward: the preferred answer (text, an assistant message, or "
        "the whole conversation ending in it)",
    )
    rejected_column: str = Field(
        "rejected",
        description="preference | reward: the dispreferred answer, in the chosen column's layout",
    )
    system_prompt: str | None = None
    split: SplitSpec = SplitSpec()
    validation_path: str | None = None
    test_path: str | None = None
    max_length: int | Literal["auto"] = Field(
        "auto",
        description="tokens per example; longer ones are truncated (or windowed). auto: the "
        "99th percentile of the training split's token lengths, rounded up to a multiple of 8, "
        "capped by the model's positions; the run records the number it chose",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="processes that read and tokenize the data (batched, in parallel); null: "
        "the cores available to this process (os.sched_getaffinity); splits under 1,000 "
        "examples are tokenized, and sources other than local utf-8 jsonl files of 16 MiB or "
        "more are read, in the main process",
    )
    long_documents: Literal["truncate", "windows"] = Field(
        "truncate",
        description="classification: a text longer than max_length is cut (truncate), or read "
        "whole as windows of max_length overlapping by a quarter; logits averaged per document",
    )

    @field_validator("max_length", mode="before")
    @classmethod
    def _auto_or_tokens(cls, v: Any) -> Any:
        """One message for every wrong value (a union would list each branch's complaint)."""
        if v == "auto":
            return v
        if isinstance(v, bool):
            raise ValueError("expects auto or a number, not true/false")
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, float) and (v != v or abs(v) == float("inf")):  # nan, inf
            raise ValueError("must be auto or a finite number of tokens")
        if not isinstance(v, int):
            raise ValueError("must be auto or a whole number of tokens")
        if v < 1:
            raise ValueError("must be auto or at least 1 token")
        if v > 1_048_576:
            raise ValueError("must be auto or less than or equal to 1048576 tokens")
        return v

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
    train_on: list[Literal["answers", "reasoning", "tool_calls"]] | None = Field(
        None,
        description="chat data: which parts of the assistant turns are targets: answers (the "
        "content), reasoning (reasoning_content), tool_calls; null: all of them. A part left "
        "out stays in the conversation as context. The template's markers and the end of a turn "
        "are targets when any part of that turn is",
    )

    @field_validator("train_on")
    @classmethod
    def _some_parts_once(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("names no part: list answers, reasoning and/or tool_calls")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("names a part twice")
        return v

    chat_template: str | None = Field(
        None,
        description="chat or instruction data: the template conversations are rendered with: "
        "model (the default: the model's own), one shipped with ftcli ("
        + ", ".join(CHAT_TEMPLATES)
        + "), or the path of a Jinja file; saved with the adapter and the merged model, so "
        "predict, chat and serve render what training saw",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_choice(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"expects model, {', '.join(CHAT_TEMPLATES)} or a Jinja file's path")
        return None if v == "model" else v

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

    streaming: bool = Field(
        False,
        description="read the training split from the source as it trains (local jsonl/parquet "
        "files or globs, hub datasets), never whole and never cached: splits by a hash of each "
        "example, test/validation = the first max_test_examples / max_validation_examples "
        "(default 1000) of their buckets; needs train.max_steps (docs: data-cache.md#streaming)",
    )
    shuffle_buffer: int = Field(
        10_000,
        ge=2,
        description="data.streaming: examples held (tokenized) to shuffle and group by length; "
        "a seeded random half is drawn into micro-batches each time it fills",
    )

    def packs(self, task: str, kind: str = "lora") -> bool:
        """Whether training packs examples: by default on for causal LMs, except with prompt-style
        methods (peft prepends virtual tokens to a 2D mask; a packed batch's mask is 4D)."""
        if self.packing is None:
            return task == "causal_lm" and kind not in PROMPT_KINDS
        return self.packing

    @property
    def style(self) -> str:
        """How a causal-LM example is laid out, derived from which columns are named (a mixture:
        its first source's; the checks make every source's examples of one kind)."""
        return _style(self.sources[0] if self.sources else self)

    def source_specs(self) -> list[SourceSpec]:
        """The sources as a list: data.sources, or data.path with the section's own keys."""
        if self.sources:
            return list(self.sources)
        return [SourceSpec(**{k: getattr(self, k) for k in SOURCE_KEYS})]

    def for_source(self, source: SourceSpec) -> DataSpec:
        """This section as if ``source`` were its one data.path (its columns and layout)."""
        return self.model_copy(
            update={**{k: getattr(source, k) for k in SOURCE_KEYS}, "sources": None}
        )

    @property
    def where(self) -> str:
        """What the data is, in a few words: its path, or the mixture's source names."""
        if not self.sources:
            return str(self.path)
        return f"{len(self.sources)} sources: " + ", ".join(source_names(self.sources))


class QuantSpec(_Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"


class MethodSpec(_Section):
    """How the model is adapted: full fine-tuning, LoRA (and variants), QLoRA, or another peft method."""

    kind: Literal["full", "lora", "qlora", "ia3", "prefix", "prompt", "ptuning", "vera"]
    r: int = Field(8, gt=0, le=4096, description="LoRA rank")
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
    epochs: float = Field(1.0, gt=0, le=10_000)
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
        description="auto = timed on this machine (float32 vs bf16, fp16 on a CUDA GPU without "
        "bf16, at the model's layer shapes; cached per machine): the half type only when it is "
        ">= 1.1x as fast",
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


PreferenceLoss = Literal["dpo", "ipo", "simpo", "orpo", "kto"]


class PreferenceSpec(_Section):
    """task preference: the loss that turns chosen/rejected log-probs into a gradient, its keys,
    and the reference model the log-ratios are taken against (docs/preference.md)."""

    model_config = ConfigDict(populate_by_name=True)

    loss: PreferenceLoss = Field(
        "dpo", description="dpo | ipo | simpo | orpo | kto (docs/preference.md#losses)"
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="dpo, ipo, kto: the KL strength (default 0.1); simpo: the reward scale "
        "(default 2.0, SimPO's)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo: the share of pairs assumed flipped (conservative DPO)",
    )
    gamma: float = Field(
        1.0, ge=0, description="simpo: the target reward margin (gamma/beta = 0.5 by default)"
    )
    lambda_: float = Field(
        0.1,
        gt=0,
        alias="lambda",
        description="orpo: the weight of the odds-ratio term (a recipe writes it as lambda)",
    )
    reference: str = Field(
        "start",
        min_length=1,
        description="dpo, ipo, kto: start (the model the run starts from; with an adapter, the "
        "same weights with the adapter off) | a run folder | a model name",
    )
    precompute_reference: bool = Field(
        False,
        description="dpo, ipo, kto: score the reference once before training (cached with the "
        "data); each step then runs the policy only",
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples")

    @property
    def beta_value(self) -> float:
        """beta as the loss reads it: the recipe's, else the loss's default."""
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference model (SimPO and ORPO do not)."""
        return self.loss in PREFERENCE_KEYS["reference"]


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
    task: Literal["classification", "causal_lm", "preference", "reward"]
    description: str | None = None
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    train: TrainSpec = TrainSpec()
    preference: PreferenceSpec = PreferenceSpec()
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
        drop_unapplied(d, self)  # a key that does nothing here is not written
        if "preference" in d:  # the alias is the key a recipe writes
            lam = d["preference"].pop("lambda_")
            if self.preference.loss == "orpo":
                d["preference"]["lambda"] = lam
            if "beta" in d["preference"]:  # the loss's own default, written out
                d["preference"]["beta"] = self.preference.beta_value
        if self.data.augment is None:
            d["data"].pop("augment")
        if self.data.sources is None:
            d["data"].pop("sources")
        else:  # each source names its own: the section's one-source keys are not written
            for k in SOURCE_KEYS:
                d["data"].pop(k, None)
            d["data"]["sources"] = [
                {k: v for k, v in s.items() if v is not None} for s in d["data"]["sources"]
            ]
        if self.tune is None:
            d.pop("tune")
        if self.model.add_tokens is None:  # written only where a recipe adds tokens
            d["model"].pop("add_tokens")
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
