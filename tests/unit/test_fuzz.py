"""Fuzzing the two surfaces a user writes: recipes (mutations of every bundled recipe, through
`ftcli validate`) and data files (through the readers). Every outcome is a clean result or one
clear user error; never a traceback, never a hang. Fixed seed, bounded examples (about a minute
in all on an idle machine). The outcomes by kind are written to OUTCOMES and printed at the end."""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import re
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftcli.errors import FtcliError
from ftcli.recipe import bundled_recipes_dir

OUTCOMES: collections.Counter = collections.Counter()


def fuzz(n: int):
    return settings(FUZZ_BASE, max_examples=n)


FUZZ_BASE = settings(
    derandomize=True,  # a fixed seed: the same cases every run
    database=None,
    deadline=20_000,  # a hang (billion laughs, catastrophic regex) fails, a busy machine not
    suppress_health_check=list(HealthCheck),
)
RECIPES = sorted(bundled_recipes_dir().glob("*.yaml"))


def _paths(node, prefix=()):
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


def _get_parent(doc, path):
    node = doc
    for p in path[:-1]:
        node = node[p]
    return node


WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1, 0, 1e308, -1e308, 2**63, 0.5, 1.5]),
    st.text(max_size=30),
    st.sampled_from(["x" * 200_000, "ü" * 10_000, "\u202e\u0000\ufeff", "1e-4", "..", "../../etc"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def mutated_recipe(draw):
    """(kind, YAML text): one bundled recipe with one or more mutations."""
    path = draw(st.sampled_from(RECIPES))
    doc = yaml.safe_load(path.read_text())
    kinds = []
    for _ in range(draw(st.integers(1, 3))):
        keys = _paths(doc) if isinstance(doc, dict) else []
        kind = draw(st.sampled_from(["drop", "unknown", "retype", "number", "text"]))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        parent = _get_parent(doc, key)
        if not isinstance(parent, dict):
            continue
        if kind == "drop":
            parent.pop(key[-1], None)
        elif kind == "unknown":
            parent[draw(st.text(min_size=1, max_size=12))] = draw(WEIRD)
        elif kind == "retype":
            parent[key[-1]] = draw(WEIRD)
        elif kind == "number":
            parent[key[-1]] = draw(st.sampled_from([-1, 0, -0.5, 1e9, 1e308, float("nan")]))
        else:
            parent[key[-1]] = draw(st.text(max_size=40))
        kinds.append(kind)
    return "+".join(kinds) or "none", yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _laughs(depth: int, width: int) -> str:
    lines = ["a0: &a0 [lol]"]
    for i in range(1, depth):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\nname: *a{depth - 1}\n"


SHAPES = {
    "billion-laughs": _laughs(12, 10),
    "laughs-in-a-key": "x: &x [a, b]\ny: &y [*x, *x, *x]\nname: q\ntask: causal_lm\n"
    "model: {name: m}\ndata: {path: d, text_column: *y}\nmethod: {kind: lora}\n",
    "anchor-merge": "base: &b {kind: lora, r: 4}\nname: q\ntask: causal_lm\nmodel: {name: m}\n"
    "data: {path: d}\nmethod:\n  <<: *b\n  r: 8\n",
    "list": "- name: q\n- task: causal_lm\n",
    "scalar": "just a string\n",
    "number": "42\n",
    "empty": "",
    "two-documents": "name: a\n---\nname: b\n",
    "python-tag": "name: !!python/object/apply:os.system [echo hi]\n",
    "deep": "a: " + "[" * 3000 + "]" * 3000 + "\n",
    "tab-indent": "name: q\n\ttask: x\n",
    "null-key": "null: 1\nname: q\n",
    "complex-key": "? [a, b]\n: 1\nname: q\n",
    "bom-utf8": "\ufeffname: q\ntask: causal_lm\nmodel: {name: m}\ndata: {path: d}\nmethod: {kind: lora}\n",
}


def _validate(tmp_path, text: str, capsys) -> tuple[int, str]:
    from ftcli.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--no-data"])
    return exc.value.code, capsys.readouterr().err


def _check_outcome(code: int, err: str, what: str) -> str:
    assert "Traceback" not in err, f"{what}: {err[-2000:]}"
    assert code in (0, 1), f"{what}: exit {code}: {err[-2000:]}"
    if code == 0:
        return "exit 0"
    assert err.startswith("error: "), f"{what}: {err[:500]}"
    head = re.match(r"error: (\d+) problems? in the recipe:\n", err)
    if head:  # one line per problem, as many as the header says
        body = [x for x in err[head.end() :].splitlines() if x.startswith("  ") and x.strip()]
        body = [x for x in body if not x.startswith("  hint:")]
        assert len(body) == int(head.group(1)), f"{what}: {err[:2000]}"
        return "exit 1, recipe problems"
    return "exit 1, one error"


@fuzz(160)
@given(case=mutated_recipe())
def test_fuzzed_recipes_validate_or_fail_cleanly(tmp_path_factory, case, capsys):
    kind, text = case
    code, err = _validate(tmp_path_factory.mktemp("fz"), text, capsys)
    OUTCOMES[f"recipe {_check_outcome(code, err, kind)}"] += 1


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_yaml_shapes_validate_or_fail_cleanly(tmp_path, shape, capsys):
    code, err = _validate(tmp_path, SHAPES[shape], capsys)
    OUTCOMES[f"recipe {_check_outcome(code, err, shape)}"] += 1
    if shape == "billion-laughs":
        assert "expands to more than" in err


def _leaf_keys(doc) -> list[tuple]:
    """Dotted keys whose value is a number (not a bool) in a bundled recipe: where the faults go."""
    return [
        k
        for k in _paths(doc)
        if isinstance(v := _get_parent(doc, k)[k[-1]], int | float) and not isinstance(v, bool)
    ]


NUMBER_FAULTS = st.sampled_from(
    [
        ("inf", ".inf", "finite number"),
        ("-inf", "-.inf", "finite number"),
        ("nan", ".nan", "finite number"),
        ("bool", "true", "not true/false"),
        ("yes", "yes", "not true/false"),
        ("huge-int", "9" * 4400, "an integer of 4400 digits"),
    ]
)


@fuzz(60)
@given(data=st.data(), fault=NUMBER_FAULTS)
def test_number_faults_are_one_error_naming_the_key(tmp_path_factory, data, fault, capsys):
    """inf/nan, YAML booleans and integers past Python's digit limit where a bundled recipe has a
    number: exit 1 and one problem line that names the key (or, for the huge integer, the line)."""
    name, literal, says = fault
    path = data.draw(st.sampled_from(RECIPES))
    doc = yaml.safe_load(path.read_text())
    keys = [k for k in _leaf_keys(doc) if k[0] != "tune"]
    if not keys:
        return
    key = data.draw(st.sampled_from(keys))
    _get_parent(doc, key)[key[-1]] = "__FAULT__"
    text = yaml.safe_dump(doc, sort_keys=False).replace("'__FAULT__'", "__FAULT__")
    text = text.replace("__FAULT__", literal)
    code, err = _validate(tmp_path_factory.mktemp("fz"), text, capsys)
    _check_outcome(code, err, f"{name} at {'.'.join(key)}")
    assert code == 1, f"{name} at {'.'.join(key)} was accepted"
    assert err.startswith("error: 1 problem in the recipe:\n"), err[:2000]
    line = err.splitlines()[1]
    assert says in line or "is not one of" in line, err[:2000]  # a Literal lists its choices
    if name != "huge-int":  # a YAML-level fault is located by its line only
        assert f": {'.'.join(key)}: " in line, err[:2000]
    assert len(err) < 2000  # the value itself is not echoed in full
    OUTCOMES[f"recipe number fault {name}: exit 1"] += 1


@fuzz(40)
@given(
    raw=st.binary(min_size=1, max_size=200).filter(lambda b: not _utf8(b)),
    where=st.sampled_from(["start", "name"]),
)
def test_non_utf8_recipes_are_one_located_error(tmp_path_factory, raw, where, capsys):
    text = RECIPES[0].read_bytes()
    blob = raw + text if where == "start" else text.replace(b"name: ", b"name: " + raw, 1)
    path = tmp_path_factory.mktemp("fz") / "r.yaml"
    path.write_bytes(blob)
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--no-data"])
    err = capsys.readouterr().err
    _check_outcome(exc.value.code, err, f"non-utf8 {raw[:20]!r}")
    assert exc.value.code == 1
    assert re.search(rf"^  {re.escape(str(path))}:\d+: not UTF-8 text \(byte 0x", err, re.M), err
    OUTCOMES["recipe non-utf8 bytes: exit 1"] += 1


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@fuzz(20)
@given(
    key=st.sampled_from(["method.r", "train.batch_size", "train.epochs", "data.max_length"]),
    literal=st.sampled_from(["9" * 4400, ".inf", ".nan", "true", "off"]),
)
def test_set_number_faults_are_one_error(tmp_path_factory, key, literal, capsys):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", "quickstart", "--no-data", "--set", f"{key}={literal}"])
    err = capsys.readouterr().err
    _check_outcome(exc.value.code, err, f"--set {key}={literal[:10]}")
    assert exc.value.code == 1 and len(err) < 2000, err[:2000]
    assert key in err
    OUTCOMES["recipe --set number fault: exit 1"] += 1


# --------------------------------------------------------------------------- data files


def _recipe(path, task="classification", **data):
    from ftcli.recipe import recipe_from_mapping

    d = {"path": str(path), **data}
    if task == "classification":
        d.setdefault("label_column", "label")
    return recipe_from_mapping(
        {"name": "t", "task": task, "model": {"name": "m"}, "data": d, "method": {"kind": "full"}}
    )


def _load(recipe, path) -> str:
    """'loaded' or 'DataError'; a DataError must name the file."""
    from ftcli.data.examples import CleanCounts, load_examples

    try:
        load_examples(recipe, recipe.data.path, CleanCounts())
    except FtcliError as exc:
        msg = exc.render()
        assert str(path) in msg or recipe.data.path in msg or "data." in msg, msg
        return type(exc).__name__
    return "loaded"


EXTS = ["csv", "tsv", "json", "jsonl", "txt", "yml", "parquet", "csv.gz", "jsonl.bz2"]


@fuzz(120)
@given(ext=st.sampled_from(EXTS), raw=st.binary(max_size=400))
def test_random_bytes_are_read_or_refused_naming_the_file(tmp_path_factory, ext, raw):
    path = tmp_path_factory.mktemp("fz") / f"d.{ext}"
    path.write_bytes(raw)
    OUTCOMES[f"data random bytes: {_load(_recipe(path, task='causal_lm'), path)}"] += 1


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_ROWS = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(30)]


@fuzz(40)
@given(comp=st.sampled_from(["gz", "bz2"]), cut=st.floats(0.0, 0.99))
def test_truncated_archives_are_data_errors(tmp_path_factory, comp, cut):
    packed = (gzip.compress if comp == "gz" else bz2.compress)(_jsonl(GOOD_ROWS))
    path = tmp_path_factory.mktemp("fz") / f"d.jsonl.{comp}"
    path.write_bytes(packed[: int(len(packed) * cut)])
    outcome = _load(_recipe(path), path)
    assert outcome != "loaded" or cut == 0.0  # an empty file holds no records either
    OUTCOMES[f"data truncated {comp}: {outcome}"] += 1


@fuzz(20)
@given(comp=st.sampled_from(["gz", "bz2"]), kib=st.integers(1, 400), noise=st.booleans())
def test_compressed_data_past_the_cap_is_refused_naming_it(tmp_path_factory, comp, kib, noise):
    """Data that decompresses past the cap (lowered to 128 KiB here) is refused, naming the
    file and the cap; data under it reads."""
    import random

    from ftcli.data import read

    old, read.DECOMPRESS_FLOOR = read.DECOMPRESS_FLOOR, 128 * 2**10
    try:
        words = [random.Random(kib).choice(["alpha", "beta", "gamma"]) for _ in range(kib * 40)]
        body = (" ".join(words) if noise else "word " * kib * 200)[: kib * 2**10 - 1] + "\n"
        path = tmp_path_factory.mktemp("fz") / f"d.txt.{comp}"
        path.write_bytes((gzip.compress if comp == "gz" else bz2.compress)(body.encode()))
        cap = read.decompress_cap(path.stat().st_size)
        exc = _data_error(_recipe(path, task="causal_lm"))
    finally:
        read.DECOMPRESS_FLOOR = old
    if len(body) > cap:
        assert exc is not None and exc.message.startswith(
            f"{path}: decompresses to more than {cap / 2**20:g} MiB, the cap for a "
            f"{path.stat().st_size:,}-byte archive"
        ), exc
        OUTCOMES[f"data over-cap {comp}: refused"] += 1
    else:
        assert exc is None, exc
        OUTCOMES[f"data over-cap {comp}: loaded"] += 1


PARTS = st.sampled_from(["..", ".", "bundled", "recipes", "", "x.csv", "/"])


@fuzz(40)
@given(parts=st.lists(PARTS, min_size=1, max_size=5))
def test_pkg_paths_that_leave_the_package_are_refused(parts):
    """``pkg:ftcli/...`` with a '..' or an absolute part is refused by name, whatever follows;
    one that stays inside resolves inside the package or is 'not found' inside it."""
    from ftcli.errors import SourceError
    from ftcli.sources import resolve_pkg

    spec = "pkg:ftcli/" + "/".join(parts)
    inner = spec[len("pkg:") :].strip("/").partition("/")[2]
    escapes = inner.startswith("/") or ".." in inner.split("/")
    try:
        path = resolve_pkg(spec)
    except SourceError as exc:
        assert "\n" not in exc.message
        if escapes:
            assert exc.message == (
                f"{spec}: the path inside package 'ftcli' must stay inside it ('..' or an "
                "absolute path would leave the package)"
            )
        else:
            assert exc.message.startswith(f"{spec}: no "), exc.message
        OUTCOMES[f"pkg path: {'escape refused' if escapes else 'not found'}"] += 1
        return
    assert not escapes, (spec, path)
    base = resolve_pkg("pkg:ftcli").resolve()
    assert path.resolve().is_relative_to(base), (spec, path)
    OUTCOMES["pkg path: resolved inside"] += 1


CELL = st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.just("\x00")


@fuzz(60)
@given(rows=st.lists(st.lists(CELL, min_size=0, max_size=4), min_size=1, max_size=8))
def test_ragged_csv_with_nuls(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fz") / "d.csv"
    text = "text,label\n" + "\n".join(",".join(r) for r in rows) + "\n"
    path.write_bytes(text.encode("utf-8"))
    OUTCOMES[f"data ragged csv: {_load(_recipe(path), path)}"] += 1


def _data_error(recipe) -> FtcliError | None:
    """The one user error loading ``recipe``'s data ends in, else None; a data or source error
    is one line (a recipe error lists its problems one a line)."""
    from ftcli.data.examples import CleanCounts, load_examples
    from ftcli.errors import RecipeError

    try:
        load_examples(recipe, recipe.data.path, CleanCounts())
    except FtcliError as exc:
        assert isinstance(exc, RecipeError) or "\n" not in exc.message, exc.message
        return exc
    return None


NAMES = st.sampled_from(["text", "label", "note", "text "])
PLAIN = st.text(alphabet="ab é\x00\t", max_size=5)


@fuzz(60)
@given(
    header=st.lists(NAMES, min_size=1, max_size=4),
    rows=st.lists(st.lists(PLAIN, max_size=5), min_size=1, max_size=8),
)
def test_csv_headers_and_row_shapes_are_named_exactly(tmp_path_factory, header, rows):
    """A header naming a column twice, or rows of the wrong length, are refused as that, with
    the duplicated names or the line numbers; anything else reads as before."""
    path = tmp_path_factory.mktemp("fz") / "d.csv"
    path.write_bytes((",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows)).encode())
    exc = _data_error(_recipe(path, task="causal_lm"))
    twice = [c for c in dict.fromkeys(header) if header.count(c) > 1]
    kept = [(i + 2, r) for i, r in enumerate(rows) if r and not (len(r) == 1 and not r[0].strip())]
    ragged = [(line, len(r)) for line, r in kept if len(r) != len(header)]
    if twice:
        assert exc is not None and exc.message.startswith(
            f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once"
        ), exc
        OUTCOMES["data csv shape: duplicate header"] += 1
    elif ragged:
        shown = ", ".join(f"line {n} has {k}" for n, k in ragged[:5])
        assert exc is not None and exc.message.startswith(
            f"{path}: {len(ragged)} row(s) do not have the header's {len(header)} fields: {shown}"
        ), exc
        OUTCOMES["data csv shape: ragged rows"] += 1
    else:
        assert exc is None or "fields" not in exc.message and "header" not in exc.message, exc
        OUTCOMES[f"data csv shape: {'loaded' if exc is None else 'other error'}"] += 1


@fuzz(30)
@given(depth=st.integers(1, 9), width=st.integers(1, 12), wrap=st.booleans())
def test_deep_data_aliases_are_refused_past_the_bound(tmp_path_factory, depth, width, wrap):
    """Aliases of aliases in a YAML data file: refused, fast and by name, once they add more
    values than the bound; read when they add fewer."""
    lines = ["a0: &a0 {text: lol}"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    text = "\n".join(lines) + f"\nconversations: [*a{depth}]\n"
    if wrap:  # the same aliases inside a plain list of records
        text = "- " + "\n  ".join(text.splitlines()) + "\n"
    path = tmp_path_factory.mktemp("fz") / "d.yml"
    path.write_text(text)
    from ftcli.data.read import MAX_ALIAS_VALUES

    t0 = time.perf_counter()
    exc = _data_error(_recipe(path, task="causal_lm", messages_column="messages"))
    assert time.perf_counter() - t0 < 5  # a hang would be the bomb being built
    # each leaf is 3 values; the whole is at most ~20x the deepest level's leaves
    if width**depth * 3 > MAX_ALIAS_VALUES + 1000:
        assert exc is not None and exc.message.startswith(f"{path}: YAML aliases expand its "), exc
        assert f"reads at most {MAX_ALIAS_VALUES:,} values added by aliases" in exc.message
    if width**depth * 20 + 1000 < MAX_ALIAS_VALUES:
        assert exc is None or "YAML aliases" not in exc.message, exc
    OUTCOMES[
        f"data yaml aliases: {'refused' if exc and 'YAML aliases' in exc.message else 'read'}"
    ] += 1


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@fuzz(60)
@given(
    rows=st.lists(
        st.fixed_dictionaries({"text": JSONISH, "label": JSONISH}) | JSONISH, min_size=1, max_size=6
    ),
    task=st.sampled_from(["classification", "causal_lm"]),
)
def test_jsonl_with_wrong_types_per_field(tmp_path_factory, rows, task):
    path = tmp_path_factory.mktemp("fz") / "d.jsonl"
    path.write_bytes(_jsonl(rows))
    extra = {"messages_column": "text"} if task == "causal_lm" and len(rows) % 2 else {}
    OUTCOMES[f"data jsonl types: {_load(_recipe(path, task=task, **extra), path)}"] += 1


def test_a_5_mb_single_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "word " * 1_000_000, "label": "a"}) + "\n")
    OUTCOMES[f"data 5 MB line: {_load(_recipe(path, task='causal_lm'), path)}"] += 1
    path = tmp_path / "d.txt"
    path.write_text("x" * 5_000_000)
    assert _load(_recipe(path, task="causal_lm"), path) == "loaded"


def test_labels_that_are_numbers_in_one_row_and_strings_in_another(tmp_path):
    from ftcli.data.examples import prepare

    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t {i}", "label": [1, "1", "two", 2.0][i % 4]} for i in range(40)]
    path.write_bytes(_jsonl(rows))
    prepared = prepare(_recipe(path))
    assert prepared.labels == ["1", "2.0", "two"]  # one vocabulary of strings: 1 and "1" agree
    OUTCOMES["data mixed labels: loaded"] += 1


def test_an_empty_label_folder(tmp_path):
    (tmp_path / "d" / "pos").mkdir(parents=True)
    (tmp_path / "d" / "neg").mkdir()
    outcome = _load(_recipe(tmp_path / "d"), tmp_path / "d")
    assert outcome == "DataError"
    OUTCOMES[f"data empty label folder: {outcome}"] += 1


def test_zz_report_outcomes():
    """Runs last in this file: the cases run and their outcomes by kind."""
    total = sum(OUTCOMES.values())
    print(f"\nfuzz cases: {total}")
    for kind, n in sorted(OUTCOMES.items()):
        print(f"  {n:5d}  {kind}")
    assert total > 0
