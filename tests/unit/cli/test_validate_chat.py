"""``ftcli validate`` runs the chat check (data/chat.py) over the prepared conversations with the
recipe's template: a template that mis-masks is reported per example, with data.chat_template as
the fix; `train` refuses the same data; data.chat_template where it does nothing is an error."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import _train_tokenizer, write_recipe
from tests.unit.test_chat import DROPS_REASONING


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder with just what validate reads: the tokenizer (ChatML) and a config."""
    out = tmp_path_factory.mktemp("tokonly")
    _train_tokenizer("bpe", out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def _chat_file(path, n=40):
    rows = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": f"what is {i} plus 1 ?"},
            {"role": "assistant", "content": f"<think>count up</think>{i + 1} ."},
        ]
        if i % 4 == 0:  # a second turn: the first turn's reasoning is dropped by DROPS_REASONING
            msgs += [
                {"role": "user", "content": "and then ?"},
                {"role": "assistant", "content": "<think>again</think>nothing ."},
            ]
        rows.append({"messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, model_dir, **data):
    return write_recipe(
        tmp_path / "r.yaml",
        name="c",
        task="causal_lm",
        model={"name": str(model_dir)},
        data={
            "path": str(_chat_file(tmp_path / "chat.jsonl")),
            "messages_column": "messages",
            "split": {"validation": 0.1, "test": 0.1, "seed": 0},
            **data,
        },
        method={"kind": "lora", "r": 4, "target_modules": ["q_proj"]},
        output_dir=str(tmp_path / "runs"),
    )


def test_validate_reports_each_conversation_a_template_mis_masks(tmp_path, model_dir, cli):
    (tmp_path / "drops.jinja").write_text(DROPS_REASONING)
    recipe = _recipe(tmp_path, model_dir, chat_template="drops.jinja")  # relative to the recipe
    code, out, err = cli("validate", str(recipe))
    assert code == 1 and "Traceback" not in err
    lines = [x for x in err.splitlines() if "data.chat_template" in x]
    assert 5 <= len(lines) <= 6  # the first five examples, then how many more
    assert "example" in lines[0] and "cannot be masked safely" in lines[0]
    assert "the rendering up to assistant message 2 is not a prefix" in lines[0]
    assert "'<think>count up</think>" in lines[0]  # the first differing characters
    assert "more of the 40 conversations checked fail the same way" in lines[-1]
    assert "data.chat_template (e.g. chatml)" in err
    # the template that keeps every turn whole passes, and says what it checked
    code, out, _ = cli("validate", str(_recipe(tmp_path, model_dir, chat_template="chatml")))
    assert code == 0, out
    assert "chat template (chatml): 40 conversations" in out


def test_validate_checks_a_sample_of_a_big_data_set_and_says_so(
    tmp_path, model_dir, cli, monkeypatch
):
    from ftcli.data import chat

    monkeypatch.setattr(chat, "CHECK_ALL_UP_TO", 15)
    code, out, _ = cli("validate", str(_recipe(tmp_path, model_dir)), "--json")
    assert code == 0
    assert (
        "chat template (the model's own): a sample of 15 of 40 conversations"
        in json.loads(out)["checked"]
    )


def test_train_refuses_a_template_that_mis_masks(tmp_path, model_dir, cli):
    (tmp_path / "drops.jinja").write_text(DROPS_REASONING)
    recipe = _recipe(tmp_path, model_dir, chat_template=str(tmp_path / "drops.jinja"))
    _, _, said = cli("validate", str(recipe))
    for command in ("train", "prepare"):
        code, _, err = cli(command, str(recipe), "--set", "train.mixed_precision=no")
        assert code == 1 and "Traceback" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
        assert re.match(r"error: train example \d+ \(user: '[^']+'\): the chat template", line)
        assert "not a prefix" in line
        assert line.split(":")[1].strip() in said  # the example validate lists first
        assert "pick another template with data.chat_template" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("adapter"))


def test_a_missing_template_file_and_a_template_on_classification_are_recipe_errors(
    tmp_path, model_dir, cli
):
    code, _, err = cli(
        "validate", str(_recipe(tmp_path, model_dir, chat_template=str(tmp_path / "no.jinja")))
    )
    assert code == 1 and "data.chat_template: cannot read the template" in err
    cls = write_recipe(
        tmp_path / "cls.yaml",
        name="c",
        task="classification",
        model={"name": str(model_dir)},
        data={"path": str(tmp_path / "x.csv"), "chat_template": "chatml"},
        method={"kind": "full"},
    )
    code, _, err = cli("validate", str(cls), "--no-data")
    assert code == 1 and "chat_template" in err and "only applies to chat or instruction" in err
