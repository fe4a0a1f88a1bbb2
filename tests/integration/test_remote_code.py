"""A folder ftcli is given never turns on a model's own code by itself: only the user's recipe
or --trust-remote-code does. Records that leave out their weights' hashes are refused, merged/
folders carry hashes too, and any folder name works as an adapter's name."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ftcli.cli import app
from ftcli.merge import merge
from ftcli.serve.predictor import adapter_name, load_predictor
from ftcli.sources import trusting
from tests.conftest import trained_run


def _adapter_copy(tmp_path_factory, tiny_models, tiny_data, tmp_path, edit=None):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    folder = tmp_path / "downloaded" / "adapter"
    shutil.copytree(run / "adapter", folder)
    if edit:
        rec = json.loads((folder / "ftcli.json").read_text())
        edit(rec)
        (folder / "ftcli.json").write_text(json.dumps(rec))
    return folder


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--text", "good film", "--json"])


def test_a_record_asking_for_remote_code_is_refused_without_the_flag(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    folder = _adapter_copy(
        tmp_path_factory,
        tiny_models,
        tiny_data,
        tmp_path,
        lambda rec: rec["model"].update(trust_remote_code=True),
    )
    r = _predict(folder)
    assert r.exit_code == 1, r.output
    err = json.loads(r.stdout)["error"]
    assert "asks to run its own Python code" in err and "--trust-remote-code" in err
    r = _predict(folder, "--trust-remote-code")  # the user's explicit choice
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["predictions"][0]["label"] in ("neg", "pos")


def test_the_flag_is_scoped_to_its_command(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    folder = _adapter_copy(
        tmp_path_factory,
        tiny_models,
        tiny_data,
        tmp_path,
        lambda rec: rec["model"].update(trust_remote_code=True),
    )
    with trusting(True):
        load_predictor(str(folder))
    from ftcli.errors import FtcliError

    with pytest.raises(FtcliError, match="trust-remote-code"):
        load_predictor(str(folder))


def test_a_record_without_hashes_is_refused(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    folder = _adapter_copy(
        tmp_path_factory, tiny_models, tiny_data, tmp_path, lambda rec: rec.pop("sha256")
    )
    r = _predict(folder)
    assert r.exit_code == 1, r.output
    assert "records no sha256" in json.loads(r.stdout)["error"]


def test_merged_folders_are_hashed_and_checked(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    out = tmp_path / "m"
    merge(run, out)
    hashes = json.loads((out / "merge.json").read_text())["sha256"]
    assert hashes and all(name.endswith(".safetensors") for name in hashes)
    load_predictor(str(out))
    weights = out / sorted(hashes)[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    r = _predict(out)
    assert r.exit_code == 1 and "does not match the sha256" in json.loads(r.stdout)["error"]


def test_any_folder_name_works_for_an_adapter(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    """An adapter under a folder whose name holds a dot (tmp.XXXX, models/v1.2/) used to fail:
    peft refuses a dot in an adapter's name."""
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    folder = tmp_path / "tmp.Xy12" / "v1.2" / "adapter"
    shutil.copytree(run / "adapter", folder)
    assert adapter_name(folder) == "v1_2"
    r = _predict(folder)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app, ["predict", "--adapter", f"my.name={folder}", "--text", "x", "--json"]
    )
    assert r.exit_code == 1 and "NAME=PATH" in json.loads(r.stdout)["error"]
