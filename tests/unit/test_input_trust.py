"""Untrusted input that used to slip through: a ``pkg:`` path that climbs out of its package,
CSV files whose header or rows pandas would quietly "repair", YAML data whose aliases expand
without bound, compressed data with no cap on what it decompresses to, and the encoding note
that ``train`` printed but ``validate`` hid. Each ends in one clear error that names the fix."""

from __future__ import annotations

import bz2
import gzip
import json
import time

import pytest
import yaml

from ftcli.data.read import read_file
from ftcli.errors import DataError, SourceError
from ftcli.sources import resolve_pkg


@pytest.mark.parametrize(
    "spec", ["pkg:ftcli/../..", "pkg:ftcli/bundled/../../x.csv", "pkg:ftcli//etc/passwd"]
)
def test_a_pkg_path_that_leaves_its_package_is_refused(spec):
    with pytest.raises(SourceError) as exc:
        resolve_pkg(spec)
    msg = exc.value.render()
    assert f"{spec}: the path inside package 'ftcli' must stay inside it" in msg
    assert "without pkg:" in msg  # the fix


def test_a_pkg_path_inside_its_package_still_resolves():
    assert resolve_pkg("pkg:ftcli/bundled").is_dir()


# --------------------------------------------------------------------------- CSV shape


def _recipe_file(tmp_path, data_path, task="classification", **data):
    """A recipe file next to the data (relative paths resolve against it)."""
    d = {"path": str(data_path), **data}
    if task == "classification":
        d.setdefault("label_column", "label")
    doc = {"name": "t", "task": task, "model": {"name": "m"}, "data": d, "method": {"kind": "full"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cli(capsys, *args) -> tuple[int, str]:
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.err


def _rows(n=30):
    return "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(n))


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("text,text,label\n" + "".join(f"a {i},b {i},x\n" for i in range(30)))
    with pytest.raises(DataError) as exc:
        read_file(str(path))
    assert exc.value.message.startswith(
        f"{path}: the header names column(s) 'text' more than once (read as 'text', 'text.1'"
    )
    assert "its own name" in exc.value.hint
    code, err = _cli(capsys, "validate", str(_recipe_file(tmp_path, path)))
    assert code == 1 and "Traceback" not in err
    assert "the header names column(s) 'text' more than once" in err


@pytest.mark.parametrize("ext,sep", [("csv", ","), ("tsv", "\t")])
def test_ragged_csv_rows_are_reported_with_their_line_numbers(tmp_path, capsys, ext, sep):
    path = tmp_path / f"d.{ext}"
    body = _rows().replace(",", sep).splitlines(keepends=True)
    body[3] = f"a{sep}b{sep}extra\n"  # line 5 (header is line 1)
    body[9] = "no label here\n"  # line 11
    path.write_text(f"text{sep}label\n" + "".join(body))
    with pytest.raises(DataError) as exc:
        read_file(str(path))
    assert exc.value.message == (
        f"{path}: 2 row(s) do not have the header's 2 fields: line 5 has 3, line 11 has 1"
    )
    code, err = _cli(capsys, "validate", str(_recipe_file(tmp_path, path)))
    assert code == 1 and "Traceback" not in err
    assert "line 5 has 3, line 11 has 1" in err
    assert "label" not in err.split("line 5")[0].split("data.path")[-1]  # not a label problem


def test_well_formed_csv_quirks_still_read(tmp_path):
    """A quoted cell spanning lines counts as one row; blank lines are skipped; CRLF is fine."""
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,label\r\n"a, with comma\r\nand a line",x\r\n\r\n   \r\nc,y\r\n')
    assert read_file(str(path)) == [
        {"text": "a, with comma\nand a line", "label": "x"},
        {"text": "c", "label": "y"},
    ]
    path.write_text("text,label\nok,x\n" + "many words here,y\n" * 8 + 'late,"ragged",z\n')
    with pytest.raises(DataError, match="line 11 has 3"):
        read_file(str(path))


# --------------------------------------------------------------------------- YAML aliases


def _laughs(depth: int, width: int = 10) -> str:
    """Aliases of aliases: ``width ** depth`` records from a few hundred bytes."""
    lines = ["a0: &a0 {text: lol, label: x}"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nconversations: [*a{depth}]\n"


def test_a_yaml_alias_bomb_in_data_is_refused_quickly(tmp_path, capsys):
    path = tmp_path / "d.yml"
    path.write_text(_laughs(7))  # ~400 bytes; 10^7 records, 13 s and hundreds of MB when built
    t0 = time.perf_counter()
    with pytest.raises(DataError) as exc:
        read_file(str(path))
    assert time.perf_counter() - t0 < 1.0
    assert exc.value.message.startswith(f"{path}: YAML aliases expand its 23 written values to ")
    assert "reads at most 100,000 values added by aliases" in exc.value.message
    assert "write the records out" in exc.value.hint
    code, err = _cli(capsys, "validate", str(_recipe_file(tmp_path, path, task="causal_lm")))
    assert code == 1 and "Traceback" not in err and "YAML aliases expand" in err


def test_yaml_data_that_contains_itself_is_refused(tmp_path):
    path = tmp_path / "d.yml"
    path.write_text("- {text: ok}\n- &a {text: x, more: *a}\n")
    with pytest.raises(DataError, match=r"alias refers to a value that contains it \(line 2\)"):
        read_file(str(path))


def test_modest_yaml_aliases_still_read(tmp_path):
    path = tmp_path / "d.yml"
    path.write_text("- &a {text: hi, label: x}\n- *a\n- {text: yo, label: *x}\n".replace("*x", "y"))
    assert read_file(str(path)) == [{"text": "hi", "label": "x"}] * 2 + [
        {"text": "yo", "label": "y"}
    ]
    path.write_text(_laughs(3))  # 1,000 values added: far under the bound
    assert len(read_file(str(path))) == 1


# --------------------------------------------------------------------------- compressed data


def test_the_decompression_cap_scales_with_the_archive_within_bounds():
    from ftcli.data import read

    assert read.decompress_cap(1) == 256 * 2**20
    assert read.decompress_cap(2 * 2**20) == 400 * 2**20
    assert read.decompress_cap(100 * 2**30) == 4 * 2**30


@pytest.mark.parametrize("comp", ["gz", "bz2"])
def test_compressed_data_past_the_cap_is_refused(tmp_path, monkeypatch, capsys, comp):
    from ftcli.data import read

    monkeypatch.setattr(read, "DECOMPRESS_FLOOR", 2**20, raising=False)  # 1 MiB: test-sized
    pack = gzip.compress if comp == "gz" else bz2.compress
    path = tmp_path / f"d.jsonl.{comp}"
    path.write_bytes(pack(b'{"text": "' + b"a" * 3 * 2**20 + b'"}\n'))
    assert path.stat().st_size * 200 < 2**20  # the floor is the cap here
    with pytest.raises(DataError) as exc:
        read_file(str(path))
    assert exc.value.message == (
        f"{path}: decompresses to more than 1 MiB, the cap for a {path.stat().st_size:,}-byte "
        "archive (200x its size, at least 1 MiB, at most 4 GiB)"
    )
    assert "decompress it yourself" in exc.value.hint
    code, err = _cli(capsys, "validate", str(_recipe_file(tmp_path, path, task="causal_lm")))
    assert code == 1 and "Traceback" not in err and "decompresses to more than 1 MiB" in err
    path.write_bytes(pack(b'{"text": "' + b"a" * (2**20 - 20) + b'"}\n'))  # under: reads
    assert len(read_file(str(path))[0]["text"]) == 2**20 - 20


# --------------------------------------------------------------------------- encoding notes


def test_validate_prints_the_encoding_note_train_prints(tmp_path, capsys):
    from ftcli.data.examples import prepare
    from ftcli.recipe import load_recipe

    path = tmp_path / "d.csv"
    rows = "".join(f"caf\u00e9 cr\u00e8me num\u00e9ro {i},{'ab'[i % 2]}\n" for i in range(40))
    path.write_bytes(("text,label\n" + rows).encode("cp1252"))
    recipe = _recipe_file(tmp_path, path)
    (note,) = prepare(load_recipe(str(recipe))).stats["notes"]  # what `train` warns about
    assert note.startswith(f"{path}: not utf-8 (byte 0xe9 at offset ")
    code, err = _cli(capsys, "validate", str(recipe))
    assert code == 0 and note in err
    from ftcli.cli import main

    with pytest.raises(SystemExit):
        main(["validate", str(recipe), "--json"])
    assert note in json.loads(capsys.readouterr().out)["warnings"]
    code, err = _cli(capsys, "validate", str(recipe), "--strict")
    assert code == 1 and note in err and "warning(s) with --strict" in err
    encoding = note.rsplit("data.encoding: ", 1)[1].split()[0]
    code, err = _cli(capsys, "validate", str(recipe), "--set", f"data.encoding={encoding}")
    assert code == 0 and "charset-normalizer" not in err  # saying so silences it
