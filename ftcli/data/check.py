"""``ftcli validate``'s data checks: everything about the data that needs no model (the sources
exist, the named columns are there and hold text, the labels occur, the splits are not empty),
every problem found at once, each located at its recipe key."""

from __future__ import annotations

from collections.abc import Callable

from ftcli.data.examples import (
    CleanCounts,
    load_examples,
    prepare,
    required_columns,
    source_of,
)
from ftcli.data.read import read_source
from ftcli.errors import DataError, FtcliError, Problem, RecipeError, SourceError
from ftcli.recipe import Recipe
from ftcli.recipe.checks import model_path_problems
from ftcli.sources import is_hub_spec


def _as_problems(exc: FtcliError, recipe: Recipe, key: str) -> list[Problem]:
    if isinstance(exc, RecipeError):
        return exc.problems
    return [recipe.problem(key, exc.message, exc.hint)]


def _is_number(value) -> bool:
    if isinstance(value, bool | int | float):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _column_types(recipe: Recipe, records: list[dict], at: str = "data") -> list[Problem]:
    """A text column that holds numbers (or lists) is the wrong column, whatever str() makes of it."""
    problems = []
    for key, col in required_columns(recipe, at).items():
        if key.rsplit(".", 1)[-1] in ("label_column", "messages_column") or col not in records[0]:
            continue
        sample = [r[col] for r in records[:200] if r.get(col) not in (None, "")]
        if sample and all(_is_number(v) for v in sample):
            problems.append(
                recipe.problem(
                    key,
                    f"column {col!r} holds only numbers (e.g. {sample[0]!r}), not text",
                    "name the column that holds the text",
                )
            )
    return problems


def data_problems(recipe: Recipe) -> tuple[list[Problem], list[str], list[str]]:
    """(problems, what was checked, notes): every source, its columns and their types, then the
    labels and split sizes (``prepare`` without writing). The notes say what could not be checked
    and why, and which encoding was detected for a file that is not utf-8 (the note ``train``
    prints). Hub datasets are not downloaded here; one neither cached nor reachable is a note."""
    d = recipe.data
    problems: list[Problem] = []
    checked: list[str] = []
    notes: list[str] = []
    if d.streaming:  # never the whole corpus: the scan a streamed run starts with
        return _stream_problems(recipe)
    readable = True
    from ftcli.data.examples import source_views

    each = [
        (key, spec, recipe, "data")
        for key, spec in (
            ("data.path", d.path),
            ("data.validation_path", d.validation_path),
            ("data.test_path", d.test_path),
        )
    ]
    if d.sources:  # a mixture: each source with its own columns, located at its entry
        each += [(f"{at}.path", view.data.path, view, at) for _, view, at in source_views(recipe)]
    for key, spec, view, at in each:
        if not spec:
            continue
        try:
            try:
                source = source_of(recipe, spec)
            except SourceError as exc:
                if not is_hub_spec(spec):
                    raise
                notes.append(f"data columns not checked: {exc.message}")
                readable = False
                continue
            if source.kind == "hub":
                notes.append(f"data columns not checked: {spec} is a hub dataset")
                readable = False
                continue
            records = read_source(source, view.data)
            counts = CleanCounts()
            load_examples(view, spec, counts, at, recipe)
            notes += [n for n in counts.notes if n not in notes]  # what `train` prints too
            problems += _column_types(view, records, at)
        except FtcliError as exc:
            problems += _as_problems(exc, recipe, key)
            readable = False
    if not problems and readable:
        checked.append("data columns")
        try:
            prepared = prepare(recipe)
            checked.append("labels and splits")
            sizes = prepared.stats["sizes"]
            checked.append(", ".join(f"{k} {v}" for k, v in sizes.items()))
        except FtcliError as exc:
            problems += _as_problems(exc, recipe, "data")
        else:
            found, done, said = chat_template_problems(recipe, prepared)
            problems += found
            checked += done
            notes += said
    return problems, checked, notes


def _uncached_hub_model(recipe: Recipe) -> str | None:
    """Why the model's tokenizer is not read here: a hub model not in the cache (validate
    downloads nothing; train does); None for a local model or a cached one."""
    from pathlib import Path

    from ftcli.sources import PKG, looks_local

    name = recipe.model.name
    if name.startswith(PKG) or looks_local(name) or Path(name).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(name, "tokenizer_config.json", revision=recipe.model.revision)
    if isinstance(got, str):
        return None
    return f"the model {name} is not in the hub cache (train downloads it)"


def chat_template_problems(recipe: Recipe, prepared) -> tuple[list[Problem], list[str], list[str]]:
    """The chat check (data/chat.py) over the prepared conversations, with the recipe's template:
    every conversation up to chat.CHECK_ALL_UP_TO, else a sample that size (the count said). Needs
    the model's tokenizer (not its weights); one that cannot be loaded here is a note."""
    from ftcli.data.chat import (
        CHECK_ALL_UP_TO,
        check_conversations,
        first_user,
        marks_generation,
        recipe_tokenizer,
    )

    if recipe.task != "causal_lm" or recipe.data.style not in ("chat", "instruction"):
        return [], [], []
    key = "data.chat_template"
    uncached = _uncached_hub_model(recipe)
    if uncached:
        return [], [], [f"chat template not checked: {uncached}"]
    try:
        tokenizer, _, _ = recipe_tokenizer(recipe)
    except FtcliError as exc:
        if "chat_template" in exc.message:
            return _as_problems(exc, recipe, key), [], []
        return [], [], [f"chat template not checked: {exc.message}"]
    also = None
    if marks_generation(tokenizer):  # its assistant masks must agree with the spans too
        from ftcli.data.tokenize import _causal_batch

        def also(messages):
            try:
                _causal_batch(
                    [{"messages": messages}],
                    tokenizer=tokenizer,
                    L=1 << 30,
                    loss_on="completion",
                    add_eos=False,
                )
            except DataError as exc:
                return exc.message.split("cannot be masked safely: ", 1)[-1]
            return None

    found = check_conversations(tokenizer, prepared.splits, CHECK_ALL_UP_TO, also=also)
    what = "the model's own" if not recipe.data.chat_template else recipe.data.chat_template
    if found.checked < found.total:
        done = f"chat template ({what}): a sample of {found.checked:,} of {found.total:,} conversations"
    else:
        done = f"chat template ({what}): {found.checked:,} conversations"
    if not found.failed:
        return [], [done], []
    hint = "pick a template that renders every turn the same way: data.chat_template (e.g. chatml)"
    problems = [
        recipe.problem(
            key,
            f"{split} example {i + 1} (user: {first_user(msgs)}) cannot be masked safely: {why}",
            hint,
        )
        for split, i, msgs, why in found.failures
    ]
    if found.failed > len(found.failures):
        problems.append(
            recipe.problem(
                key,
                f"{found.failed - len(found.failures):,} more of the {found.checked:,} "
                "conversations checked fail the same way",
                hint,
            )
        )
    return problems, [done], []


def check_recipe(
    load: Callable[[], Recipe], data: bool = True
) -> tuple[Recipe, list[str], list[str]]:
    """What ``ftcli validate`` checks: the recipe ``load`` returns, then (with ``data``) its data.
    Returns (recipe, what was checked, warnings); a RecipeError lists every problem, the data's too
    when the schema failed but the data section itself is valid."""
    try:
        r = load()
    except RecipeError as exc:
        if not data or exc.partial is None:
            raise
        raise RecipeError(exc.problems + data_problems(exc.partial)[0]) from None
    checked, notes = ["schema"], [w.render() for w in r.warnings]
    problems = model_path_problems(r)  # a local model path that is not there
    if data:
        found, done, data_notes = data_problems(r)
        problems += found
        checked += done
        notes += data_notes
    if problems:
        raise RecipeError(problems)
    return r, checked, notes


def _stream_problems(recipe: Recipe) -> tuple[list[Problem], list[str], list[str]]:
    """``data_problems`` of a streamed recipe: its formats, columns, labels and splits, checked
    on the scan of the stream's start that training begins with (data/stream.py)."""
    from ftcli.data.stream import scan

    if recipe.data.path and is_hub_spec(recipe.data.path):
        return [], [], [f"data columns not checked: {recipe.data.path} is a hub dataset (streamed)"]
    try:
        s = scan(recipe)
    except FtcliError as exc:
        return _as_problems(exc, recipe, "data"), [], []
    sizes = f"test {len(s.test)}, validation {len(s.validation)}"
    return [], ["data columns", "labels and splits (the stream's start)", sizes], []
