"""Semantic checks: combinations of recipe values that type-check but make no sense, each reported
at the key to change.

They read a validated Recipe and return problems; they never validate a mapping themselves. Whether
each tune.space value makes a valid recipe needs the loader (the ``--set`` path and the whole
validation), so load.py tries the values that ``_space_entries`` hands it: the arrows point from
load to checks only.
"""

from __future__ import annotations

import re

from ftcli.errors import Problem
from ftcli.recipe.applies import (
    LORA_KINDS,
    METHOD_KEYS,
    PAIR_TASKS,
    PREFERENCE_KEYS,
    PROMPT_KINDS,
)
from ftcli.recipe.schema import SOURCE_KEYS, SPACE_KINDS, Recipe


def _semantic_problems(r: Recipe) -> list[Problem]:
    """Combinations that type-check but make no sense. Each names the key to change. (tune's
    checks come after these, from load.py: ``_space_problems`` then ``_tune_problems``.)"""
    p = _strategy_problems(r) + _quantization_problems(r) + _speed_problems(r) + _data_problems(r)
    t = r.train
    if t.scheduler.name == "plateau" and "warmup_ratio" in t.scheduler.model_fields_set:
        p.append(r.problem("train.scheduler.warmup_ratio", "the plateau scheduler has no warmup"))
    return (
        p
        + _tracking_problems(r)
        + _eval_problems(r)
        + _augment_problems(r)
        + _streaming_problems(r)
        + _preference_problems(r)
    )


def _preference_problems(r: Recipe) -> list[Problem]:
    """The preference section: keys its loss does not read, a reference for a loss without one,
    and what pair training cannot do (docs/preference.md); what pair data cannot do is
    ``_pair_data_problems``'."""
    p = []
    if "preference" in r.model_fields_set and r.task != "preference":
        hint = (
            "task reward trains a Bradley-Terry reward model: it reads no preference section"
            if r.task == "reward"
            else "remove it, or set task to preference"
        )
        p.append(r.problem("preference", "only applies to task preference", hint))
    if r.task == "preference":
        pref = r.preference
        for key, losses in PREFERENCE_KEYS.items():
            if key not in pref.model_fields_set or pref.loss in losses:
                continue
            name = key.rstrip("_")
            if key in ("reference", "precompute_reference"):
                message = (
                    f"only applies to preference.loss {' and '.join(losses)}: {pref.loss} uses "
                    "no reference model"
                )
            else:
                message = (
                    f"only applies to preference.loss {' and '.join(losses)}, not to {pref.loss}"
                )
            p.append(r.problem(f"preference.{name}", message, "remove it"))
        uses = pref.uses_reference and pref.reference == "start" and r.method.kind != "full"
        if uses and r.method.kind in LORA_KINDS and r.method.init in ("pissa", "olora"):
            p.append(
                r.problem(
                    "method.init",
                    f"{r.method.init} rewrites the base weights, so the model with its adapter "
                    "disabled is no longer the start: the reference would be wrong",
                    "use init gaussian, or name the reference (preference.reference: the start "
                    "model's name)",
                )
            )
        if pref.loss == "kto" and r.train.batch_size < 2:
            p.append(
                r.problem(
                    "train.batch_size",
                    "kto estimates its KL term as a mean over a micro-batch's mismatched "
                    "pairs: one row is too few",
                    "set train.batch_size to 2 or more",
                )
            )
    return p


def _streaming_problems(r: Recipe) -> list[Problem]:
    """data.streaming: what a stream read once from its start cannot do (docs/data-cache.md)."""
    d, t = r.data, r.train
    if not d.streaming:
        return []
    p = []
    if t.max_steps is None:
        p.append(
            r.problem(
                "data.streaming",
                "a streamed run needs train.max_steps: no epoch length is known before the "
                "stream is read",
                "set train.max_steps (e.g. --set train.max_steps=1000)",
            )
        )
    if d.augment is not None:
        p.append(
            r.problem(
                "data.augment",
                "augmentation copies the training split, which a streamed run never holds",
                "remove it, or data.streaming",
            )
        )
    if d.encoding == "auto":
        p.append(
            r.problem(
                "data.encoding",
                "auto detection reads a whole file first, which streaming does not",
                "name the files' encoding (e.g. utf-8, latin-1)",
            )
        )
    if d.long_documents == "windows":
        p.append(
            r.problem(
                "data.long_documents",
                "windows are not available with data.streaming",
                "remove it (long texts are truncated), or data.streaming",
            )
        )
    return p


def _quantization_problems(r: Recipe) -> list[Problem]:
    """method.quantization: set on a method that does not quantize, or settings that undo it."""
    p = []
    m, t = r.method, r.train
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
    return p


def _speed_problems(r: Recipe) -> list[Problem]:
    """Packing, token budgets, kernels and precisions that the task, method or device cannot use."""
    p = []
    m, d, t = r.method, r.data, r.train
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
    # max_length auto is capped at batch_tokens when it is resolved (ftcli/data/lengths.py)
    if t.batch_tokens is not None and d.max_length != "auto" and t.batch_tokens < d.max_length:
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
    return p


def _data_problems(r: Recipe) -> list[Problem]:
    """The splits, and the columns the task reads: one layout, complete, for the right task."""
    p = []
    d = r.data
    if d.split.validation + d.split.test >= 0.9:
        p.append(
            r.problem(
                "data.split",
                f"validation + test = {d.split.validation + d.split.test:g} "
                "leaves too little to train on",
                "keep the two under 0.9 together",
            )
        )
    if d.long_documents == "windows" and r.task != "classification":
        p.append(
            r.problem(
                "data.long_documents",
                "windows only applies to task classification (a causal LM's example is one "
                "sequence: its answer cannot be averaged over windows)",
                "remove it; long causal-LM examples are truncated to data.max_length",
            )
        )
    if r.task in PAIR_TASKS:
        p += _pair_data_problems(r)
    if d.sources is not None:
        p += _mixture_problems(r)
    elif not d.path:
        p.append(
            r.problem(
                "data.path",
                "required key is missing",
                "name the data: data.path, or several datasets under data.sources",
            )
        )
    else:
        p += _layout_problems(r, d, "data")
    if r.task != "classification" and d.labels and (d.sources is not None or not d.label_column):
        p.append(
            r.problem(
                "data.labels",
                "only applies to task classification",
                "for causal_lm name the text, prompt/completion, instruction or messages columns",
            )
        )
    if d.validation_path and "validation" in d.split.model_fields_set:
        p.append(r.problem("data.split.validation", "conflicts with data.validation_path: set one"))
    if d.test_path and "test" in d.split.model_fields_set:
        p.append(r.problem("data.split.test", "conflicts with data.test_path: set one"))
    return p


def _layout_problems(r: Recipe, d, at: str) -> list[Problem]:
    """One source's columns (the data section's, or a data.sources entry's at ``at``): one
    layout, complete, for the right task."""
    if r.task in PAIR_TASKS:
        return _pair_layout_problems(r, d, at)
    p = []
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
                p.append(r.problem(f"{at}.{key}", "only applies to task causal_lm"))
    else:
        if d.label_column:
            key = f"{at}.label_column"
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
                    f"{at}.{styles[1]}",
                    f"conflicts with {at}.{styles[0]}: name one layout",
                    "chat (messages_column), instruction, or prompt/completion",
                )
            )
        if bool(d.prompt_column) != bool(d.completion_column):
            missing = "completion_column" if d.prompt_column else "prompt_column"
            p.append(
                r.problem(f"{at}.{missing}", "prompt_column and completion_column go together")
            )
        if d.instruction_column and not d.output_column:
            p.append(
                r.problem(f"{at}.output_column", "an instruction layout needs the answer's column")
            )
        if d.system_prompt and d.style not in ("chat", "instruction"):
            p.append(r.problem(f"{at}.system_prompt", "only applies to chat or instruction data"))
    return p


def _pair_data_problems(r: Recipe) -> list[Problem]:
    """Preference and reward data: what the pair layouts do not support (yet)."""
    d, p = r.data, []
    unsupported = {
        "sources": "a mixture of preference datasets is not supported: merge them into one file",
        "streaming": "preference and reward data is prepared whole (pairs are screened and "
        "deduplicated before splitting), never streamed",
        "augment": "augmentation rewrites examples; a rewritten pair is no longer the pair "
        "that was judged",
    }
    for key, why in unsupported.items():
        if getattr(d, key):
            p.append(r.problem(f"data.{key}", why, "remove it"))
    return p


def _pair_layout_problems(r: Recipe, d, at: str) -> list[Problem]:
    """The columns of preference and reward data (ftcli/data/pairs.py reads the layout)."""
    p = []
    for key in ("instruction_column", "input_column", "output_column"):
        if getattr(d, key, None):
            p.append(
                r.problem(
                    f"{at}.{key}",
                    "only applies to task causal_lm",
                    "preference data names prompt, chosen and rejected columns (or a "
                    "messages_column)",
                )
            )
    chosen, rejected = getattr(d, "chosen_column", None), getattr(d, "rejected_column", None)
    if chosen is not None and chosen == rejected:
        p.append(r.problem(f"{at}.rejected_column", f"is the chosen column too ({chosen!r})"))
    if d.messages_column and d.prompt_column:
        p.append(
            r.problem(
                f"{at}.prompt_column",
                f"conflicts with {at}.messages_column: the conversation is the prompt; set one",
            )
        )
    return p


def _mixture_problems(r: Recipe) -> list[Problem]:
    """data.sources: no one-source key beside it, each entry's layout, one kind of example for a
    causal LM, weights on every source or none, unique names."""
    d, p = r.data, []
    if d.path:
        p.append(
            r.problem(
                "data.sources",
                "conflicts with data.path: set one (data.path is the one-source shorthand)",
                "move data.path into data.sources as an entry, or remove data.sources",
            )
        )
    for key in SOURCE_KEYS[1:]:
        if key in d.model_fields_set:
            p.append(
                r.problem(
                    f"data.{key}",
                    "with data.sources, each source names its own: this key would do nothing",
                    f"set {key} in the data.sources entries that need it",
                )
            )
    for key in ("validation_path", "test_path"):
        if getattr(d, key):
            p.append(
                r.problem(
                    f"data.{key}",
                    "a mixture holds out a slice of each source (data.split): a separate file "
                    "for the whole mixture is not supported",
                    "remove it, or use data.path for one source with its own split files",
                )
            )
    if not d.sources:
        p.append(r.problem("data.sources", "names no source", "list at least one {path: ...}"))
        return p
    kinds = {"chat": "messages", "instruction": "messages", "completion": "prompt/completion"}
    first = None
    weighted = [s.weight is not None for s in d.sources]
    taken: dict[str, int] = {}
    for i, s in enumerate(d.sources):
        at = f"data.sources.{i}"
        p += _layout_problems(r, s, at)
        if s.name:
            if s.name in taken:
                p.append(
                    r.problem(f"{at}.name", f"data.sources.{taken[s.name]} has that name already")
                )
            taken.setdefault(s.name, i)
        if s.weight is not None and s.max_examples is not None:
            p.append(
                r.problem(
                    f"{at}.max_examples",
                    "conflicts with its weight: a weight sets the source's share of the "
                    "training split, max_examples its count; set one",
                )
            )
        elif any(weighted) and not weighted[i]:
            p.append(
                r.problem(
                    at,
                    "has no weight while other sources have one: weights are shares of the "
                    "training split, so every source needs one",
                    "give it a weight (e.g. 1.0), or remove the weights and cap sources with "
                    "max_examples",
                )
            )
        if r.task == "causal_lm":
            kind = kinds.get(s.style, "plain text")
            if first is None:
                first = kind
            elif kind != first:
                p.append(
                    r.problem(
                        at,
                        f"its examples are {kind}, data.sources.0's are {first}: a mixture's "
                        "sources must all become messages (chat or instruction layouts), all "
                        "prompt/completion, or all plain text",
                        "map this source's columns onto the same layout, or train it separately",
                    )
                )
    return p


def _eval_problems(r: Recipe) -> list[Problem]:
    """eval.benchmarks: a causal LM's, and their options only with them."""
    p = []
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


def _method_problems(r: Recipe) -> list[Problem]:
    """Method keys the kind does not read, and inits, DoRA, layers and freeze that cannot work."""
    p = []
    m = r.method
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
    return p


def _strategy_problems(r: Recipe) -> list[Problem]:
    """Adaptation-strategy combinations that would do nothing (issue 9)."""
    p = _method_problems(r)
    m, t, o = r.method, r.train, r.train.optimizer
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


def _space_problem(r: Recipe, key: str, message: str, hint: str | None = None) -> Problem:
    """A problem at ``tune.space.KEY``: the entry's line in the file, else the space's."""
    path = ("tune", "space", key)
    origin = r._origin
    if origin is None:
        return Problem(message, key=".".join(path), hint=hint)
    line = origin.lines.get(path) or origin.lines.get(path[:2])
    return Problem(message, key=".".join(path), file=origin.file, line=line, hint=hint)


def _space_entries(r: Recipe) -> list[tuple[str, Problem | list]]:
    """Each tune.space entry in order, with the problem of its shape, or where it has none the
    values (every choice, both bounds) that load.py then tries as recipes."""
    tune = r.tune
    if tune is None:
        return []

    def at(key: str, message: str, hint: str | None = None) -> tuple[str, Problem]:
        return key, _space_problem(r, key, message, hint)

    p: list[tuple[str, Problem | list]] = []
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
        p.append((key, values))
    return p


def _tune_problems(r: Recipe) -> list[Problem]:
    """The study's own checks: a space to search, a metric the task has, a validation split to
    select on. They follow the space's problems (an empty space has none), as they always did."""
    tune = r.tune
    if tune is None:
        return []
    p = []
    if not tune.space:
        p.append(r.problem("tune.space", "the search space is empty", "name at least one key"))
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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def model_path_problems(r: Recipe) -> list[Problem]:
    """``model.name`` that can only be a local path (``/x``, ``./x``, ``~/x``, ``x.gguf``, ``a/b/c``)
    and is not there. ``ftcli validate`` runs it; loading does not, so a run folder whose base model
    has moved still opens."""
    import os
    from pathlib import Path

    from ftcli.sources import PKG, looks_local

    name = r.model.name
    if name.startswith(PKG):
        return []
    local = looks_local(name) or (os.sep in name and not _HUB_ID.fullmatch(name))
    if not local or Path(os.path.expanduser(name)).exists():
        return []
    written = r._anchored.get("model.name")
    where = f" ({written[0]!r} read from {written[1]})" if written else ""
    return [
        r.problem(
            "model.name",
            f"no such file or folder: {name}{where}",
            "name a model folder (config.json and weights) or a .gguf file that exists, or a hub "
            "id such as org/name",
        )
    ]
