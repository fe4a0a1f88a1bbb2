"""The recipe: a strict, frozen schema and a loader that reports every problem at once.

``load_recipe(path, overrides)`` reads YAML with ``yaml.safe_load`` semantics, applies
``--set key=value`` overrides to the raw mapping, then validates. Each problem names the file, the
line, the dotted key and, where it can, the nearest valid key or value.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ftcli.errors import FtcliError, Problem, RecipeError

Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class DataSpec(_Section):
    """Where the examples come from and how their columns map onto the task."""

    path: str = Field(description="hub dataset id | file | folder | glob | pkg:PACKAGE/PATH")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt", "folder", "yaml"] = (
        "auto"
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    hub_split: str = Field("train", description="which split of a hub dataset to read")
    text_column: str = "text"
    label_column: str | None = None
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
    packing: bool | None = Field(
        None,
        description="causal_lm: concatenate a micro-batch's examples into rows (no padding), "
        "attention isolated per example; default: on for causal_lm",
    )

    def packs(self, task: str) -> bool:
        """Whether training packs examples (the default is on for causal LMs)."""
        return task == "causal_lm" if self.packing is None else self.packing

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


class MethodSpec(_Section):
    """Full fine-tuning, LoRA, or LoRA on a quantized base (QLoRA)."""

    kind: Literal["full", "lora", "qlora"]
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
    init: Literal["gaussian", "kaiming"] = Field(
        "gaussian", description="LoRA A init (B always starts at zero, so training starts at W0)"
    )
    quantization: QuantSpec | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

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


class SchedulerSpec(_Section):
    name: Literal["constant", "linear", "cosine", "plateau"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    factor: float = Field(0.5, gt=0, lt=1, description="plateau: multiply lr by this")
    patience: int = Field(1, ge=0, description="plateau: evaluations without improvement")


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


class EvalSpec(_Section):
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(
        64, gt=0, description="causal_lm: length bound for generated answers"
    )
    generate_examples: int = Field(
        64, ge=0, description="causal_lm: how many test examples to answer by generation"
    )


class MergeSpec(_Section):
    enabled: bool = True
    dtype: Dtype = "float32"
    into: Literal["dequantized", "original"] = Field(
        "dequantized", description="qlora: fold into the NF4-dequantized weights the adapter saw"
    )


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
    output_dir: str = "runs"

    _origin: RecipeOrigin | None = PrivateAttr(default=None)

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
        method, split, sched = d["method"], d["data"]["split"], d["train"]["scheduler"]
        if self.method.kind == "full":
            for key in ("r", "alpha", "dropout", "target_modules", "modules_to_save", "init"):
                method.pop(key)
        if self.method.kind == "qlora":
            method["quantization"] = self.method.quant.model_dump(mode="json")
            if self.method.quant.bits == 8:
                method["quantization"].pop("quant_type")
        else:
            method.pop("quantization")
        for name in ("validation", "test"):
            if getattr(self.data, f"{name}_path"):
                split.pop(name)
        if self.train.scheduler.name == "plateau":
            sched.pop("warmup_ratio")
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- locating keys


class RecipeOrigin:
    """Maps dotted keys to the file and line they came from (or to the ``--set`` that set them)."""

    def __init__(
        self, file: str, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]
    ):
        self.file = file
        self.lines = lines
        self.overridden = overridden

    def locate(self, path: tuple[str, ...]) -> tuple[str, int | None]:
        for i in range(len(path), 0, -1):
            if path[:i] in self.overridden:
                return "--set", None
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.file, self.lines[path[:i]]
        return self.file, None

    def problem(self, key: str, message: str, hint: str | None = None) -> Problem:
        file, line = self.locate(tuple(key.split("."))) if key else (self.file, None)
        return Problem(message, key=key, file=file, line=line, hint=hint)


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
    loc = tuple(str(p) for p in err["loc"])
    # pydantic adds the member type to loc for unions (e.g. 'list[str]'): keep only real keys
    loc = tuple(
        p for p in loc if not re.search(r"[\[\]'(]", p) and p not in {"str", "int", "float", "bool"}
    )
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        suggestion = suggest_key(loc)
        hint = f"did you mean {suggestion}?" if suggestion else None
        return origin.problem(key, "unknown key", hint)
    if kind == "missing":
        return origin.problem(key, "required key is missing")
    if kind in {"literal_error", "enum"}:
        choices = _literal_choices(loc)
        got = err.get("input")
        close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5) if choices else []
        hint = f"did you mean {close[0]!r}?" if close else None
        return origin.problem(key, f"{got!r} is not one of: {', '.join(choices)}", hint)
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = err.get("input")
    if not isinstance(got, dict | list) and got is not None:
        message = f"{message} (got {got!r})"
    return origin.problem(key, message[0].lower() + message[1:])


# --------------------------------------------------------------------------- semantic checks


def _semantic_problems(r: Recipe) -> list[Problem]:
    """Combinations that type-check but make no sense. Each names the key to change."""
    p = []
    m, d, t = r.method, r.data, r.train
    lora_keys = {"r", "alpha", "dropout", "target_modules", "modules_to_save", "init"}
    if m.kind == "full":
        for key in sorted(lora_keys & m.model_fields_set):
            p.append(
                r.problem(
                    f"method.{key}",
                    "only applies to lora and qlora, not to method.kind 'full'",
                    "remove it, or set method.kind to lora",
                )
            )
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
        if not d.label_column:
            p.append(
                r.problem(
                    "data.label_column",
                    "classification needs a label column",
                    "name the column that holds each example's label",
                )
            )
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


def recipe_from_mapping(data: Any, file: str = "<recipe>", lines=None, overridden=None) -> Recipe:
    """Validate a mapping (already YAML-parsed) into a Recipe, or raise RecipeError listing every problem."""
    origin = RecipeOrigin(file, lines or {}, overridden or set())
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


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises FtcliError/RecipeError for the user."""
    path = Path(path)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        path = path / "recipe.yaml"  # a run folder: its resolved recipe
    if not path.is_file():
        raise FtcliError(
            f"recipe not found: {path}",
            hint="give a YAML file path; `ftcli recipes` lists the bundled ones",
        )
    text = path.read_text(encoding="utf-8")
    file = str(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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
    if data is None:
        data = {}
    parsed = [parse_override(o) for o in overrides]
    if isinstance(data, dict):
        problems += apply_overrides(data, parsed)
    try:
        recipe = recipe_from_mapping(data, file, lines, {p for p, _ in parsed})
    except RecipeError as exc:
        found = problems + exc.problems
        found.sort(key=lambda q: (q.file == "--set", q.line or 0))
        raise RecipeError(found) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def bundled_recipes_dir() -> Path:
    """``recipes/`` beside the package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(name: str) -> Path:
    """A path as given, or the name of a bundled recipe (``quickstart`` -> recipes/quickstart.yaml)."""
    p = Path(name)
    if p.exists():
        return p
    for candidate in (bundled_recipes_dir() / name, bundled_recipes_dir() / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return p
