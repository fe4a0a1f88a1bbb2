"""Reasoning and tool turns in chat data (data/messages.py, data/chat.py ``part_targets``):
messages carrying ``reasoning_content`` and ``tool_calls`` are read from a source file, kept
through the prepared Arrow files, rendered by a template that writes them, and masked as
``data.train_on`` says; a template that leaves a part out, or drops earlier turns' reasoning, is
refused; ``train_on`` that changes nothing is an error."""

from __future__ import annotations

import copy
import json

import pytest

from ftcli.data import chat, pairs
from ftcli.data import tokenize as tk
from ftcli.data.examples import prepare
from ftcli.data.messages import chat_message, for_template
from ftcli.data.prepared import read_data, write_data
from ftcli.errors import DataError, RecipeError
from ftcli.recipe import recipe_from_mapping
from tests.conftest import _train_tokenizer, write_recipe

WEATHER = [
    {
        "id": "call_1",
        "type": "function",
        # OpenAI's layout: the arguments as JSON text
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
]


def conversation(answer: str = "it is sunny .") -> list[dict]:
    """A user question, an assistant turn that reasons and calls a tool (no content), the tool's
    answer, and an assistant turn that reasons and answers."""
    return [
        {"role": "user", "content": "what is the weather in paris ?"},
        {  # no content key at all: a turn of tool calls
            "role": "assistant",
            "reasoning_content": "i should call the tool",
            "tool_calls": WEATHER,
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny , 20 degrees"},
        {"role": "assistant", "content": answer, "reasoning_content": "the tool said sunny"},
    ]


def as_example(msgs: list[dict]) -> dict:
    return {
        "messages": [
            chat_message(m, "record 1", lambda v: "" if v is None else str(v)) for m in msgs
        ]
    }


# Qwen3's way: reasoning kept only in assistant turns after the last user message
DROPS_REASONING = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m['reasoning_content'] and loop.index0 > ns.last %}"
    "<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = _train_tokenizer("bpe", tmp_path_factory.mktemp("bpe"))
    t.chat_template = chat.template_text("qwen")  # writes reasoning, tool calls and tool turns
    return t


def _recipe(path, **data):
    return recipe_from_mapping(
        {
            "name": "t",
            "task": "causal_lm",
            "model": {"name": "m"},
            "data": {"path": str(path), "messages_column": "messages", "max_length": 512, **data},
            "method": {"kind": "full"},
        }
    )


def targets(tok, example: dict, **data) -> str:
    """The text of the tokens the loss is taken on."""
    params = tk.causal_params(_recipe("x.jsonl", **data).data)
    out = tk._causal_batch([example], tokenizer=tok, **params)
    ids, labels = out["input_ids"][0], out["labels"][0]
    return tok.decode([i for i, y in zip(ids, labels, strict=True) if y != tk.IGNORE_INDEX])


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
END = "<|im_end|>\n"


@pytest.mark.parametrize(
    ("train_on", "want"),
    [
        (["answers"], "it is sunny ." + END),
        (
            ["reasoning"],
            "<think>\ni should call the tool\n</think>\n\n"
            + END
            + "<think>\nthe tool said sunny\n</think>\n\n"
            + END,
        ),
        (["tool_calls"], CALL + END),
        (["answers", "tool_calls"], CALL + END + "it is sunny ." + END),
    ],
)
def test_train_on_makes_targets_of_the_parts_it_names_and_context_of_the_rest(tok, train_on, want):
    ex = as_example(conversation())
    assert targets(tok, ex, train_on=train_on, add_eos=False) == want


def test_by_default_every_part_of_the_assistant_turns_is_a_target(tok):
    ex = as_example(conversation())
    everything = (
        "<think>\ni should call the tool\n</think>\n\n"
        + CALL
        + END
        + "<think>\nthe tool said sunny\n</think>\n\nit is sunny ."
        + END
    )
    assert targets(tok, ex, add_eos=False) == everything
    listed = targets(tok, ex, add_eos=False, train_on=["tool_calls", "answers", "reasoning"])
    assert listed == everything
    seg = chat.segments(tok, ex["messages"])
    assert seg.problem is None and seg.targets is None  # the assistant spans themselves
    # the tool's answer and the user's question are never targets
    assert "sunny , 20" not in everything and "paris ?" not in everything


def test_source_messages_are_read_into_one_shape_and_kept_through_arrow(tok, tmp_path):
    rows = [{"messages": conversation(f"it is sunny . ({i})")} for i in range(12)] + [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "hello"},
            ]
        }
        for i in range(12)
    ]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(data, split={"validation": 0, "test": 0.25, "seed": 0})
    prepared = prepare(recipe, folder=tmp_path / "p")
    got = list(prepared.splits["train"]) + list(prepared.splits["test"])
    assert len(got) == 24  # an assistant turn of tool calls alone is not "empty"
    rich = [e for e in got if len(e["messages"]) == 4]
    plain = [e for e in got if len(e["messages"]) == 2]
    assert len(rich) == len(plain) == 12
    assert all(m.keys() == {"role", "content"} for e in plain for m in e["messages"])
    call = rich[0]["messages"][1]
    assert call["content"] == "" and call["reasoning_content"] == "i should call the tool"
    # the arguments' JSON text becomes a mapping: templates write it with tojson
    assert for_template([call])[0]["tool_calls"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            "id": "call_1",
        }
    ]
    assert rich[0]["messages"][2] == {
        "role": "tool",
        "content": "sunny , 20 degrees",
        "tool_call_id": "call_1",
    }
    # through the prepared files and the tokenizer: the labels say what train_on says
    folder = tmp_path / "out"
    folder.mkdir()
    write_data(
        _recipe(data, split={"validation": 0, "test": 0.25, "seed": 0}, train_on=["tool_calls"]),
        tok,
        folder,
    )
    _, tokenized = read_data(folder)
    feats = list(tokenized["train"].features)
    texts = [
        tok.decode([i for i, y in zip(f["input_ids"], f["labels"], strict=True) if y != -100])
        for f in feats
    ]
    assert sum(t == CALL + END for t in texts) == sum(
        len(e["messages"]) == 4 for e in prepared.splits["train"]
    )
    # a plain conversation has no tool call: nothing of it is a target, so it is dropped
    assert len(feats) == sum(len(e["messages"]) == 4 for e in prepared.splits["train"])


def test_a_conversation_that_opens_with_a_reasoning_assistant_is_masked_too(tok):
    msgs = [
        {"role": "assistant", "content": "hello , how can i help ?", "reasoning_content": "greet"},
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "4 .", "reasoning_content": "add them"},
    ]
    ex = as_example(msgs)
    assert chat.segments(tok, ex["messages"]).problem is None
    got = targets(tok, ex, train_on=["answers"], add_eos=False)
    # its span starts at 0 (as without reasoning): what the template writes before it is trained
    # with it; its reasoning is not
    opening = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n"
    assert got == opening + "hello , how can i help ?" + END + "4 ." + END


def test_a_template_that_does_not_write_a_part_is_refused(tok):
    t = copy.deepcopy(tok)  # the same tokenizer, with ChatML (contents only)
    t.chat_template = chat.template_text("chatml")
    ex = as_example(conversation())
    problem = chat.segments(t, ex["messages"]).problem
    assert "does not write assistant message 2's reasoning_content" in problem
    with pytest.raises(DataError, match=r"example 1 .*cannot be masked safely: .*does not write"):
        tk._causal_batch([ex], tokenizer=t, L=512, loss_on="completion", add_eos=True)


def test_a_template_that_drops_earlier_reasoning_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = DROPS_REASONING
    msgs = [
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "4 .", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3 plus 3 ?"},
        {"role": "assistant", "content": "6 .", "reasoning_content": "add again"},
    ]
    problem = chat.segments(t, msgs).problem
    assert "the rendering up to assistant message 2 is not a prefix" in problem
    assert chat.segments(t, msgs[:2]).problem is None  # the last turn keeps its reasoning


def test_bad_messages_are_one_clear_error_each():
    text = str
    with pytest.raises(DataError, match="record 3: a user message carries reasoning_content"):
        chat_message({"role": "user", "content": "x", "reasoning_content": "y"}, "record 3", text)
    with pytest.raises(DataError, match="record 3: each tool call needs a function name"):
        chat_message(
            {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}, "record 3", text
        )
    with pytest.raises(DataError, match="tool_calls must be a list"):
        chat_message({"role": "assistant", "content": "", "tool_calls": {"a": 1}}, "record 3", text)
    # preference pairs are role and content only: reasoning is refused, not dropped
    with pytest.raises(DataError, match="reasoning_content: preference pairs are read as role"):
        pairs._messages(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning_content": "r"},
            ],
            "prompt",
            4,
        )


def test_train_on_is_checked_in_the_recipe():
    ok = _recipe("x.jsonl", train_on=["answers", "reasoning"])
    assert ok.data.train_on == ["answers", "reasoning"]
    for bad, words in [
        ({"train_on": []}, "names no part"),
        ({"train_on": ["answers", "answers"]}, "names a part twice"),
        ({"train_on": ["thoughts"]}, "data.train_on"),
        ({"train_on": ["answers"], "loss_on": "all"}, "only applies to chat data"),
    ]:
        with pytest.raises(RecipeError, match=words):
            _recipe("x.jsonl", **bad)
    with pytest.raises(RecipeError, match="data.train_on: only applies to chat data"):
        recipe_from_mapping(
            {
                "name": "t",
                "task": "causal_lm",
                "model": {"name": "m"},
                "data": {
                    "path": "x",
                    "prompt_column": "p",
                    "completion_column": "c",
                    "train_on": ["answers"],
                },
                "method": {"kind": "full"},
            }
        )


def test_train_on_that_changes_nothing_is_one_error_from_prepare(tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig

    from ftcli.cli import main

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    tok = _train_tokenizer("bpe", model)
    LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1).save_pretrained(model)
    data = tmp_path / "plain.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"hi {i}"},
                        {"role": "assistant", "content": "hello"},
                    ]
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        name="r",
        task="causal_lm",
        model={"name": str(model)},
        data={
            "path": str(data),
            "messages_column": "messages",
            "chat_template": "qwen",
            "train_on": ["answers"],
        },
        method={"kind": "lora", "r": 4, "alpha": 8},
        output_dir=str(tmp_path / "runs"),
    )
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(recipe)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert "data.train_on leaves out reasoning and tool_calls, but no assistant turn" in err
    assert not any((tmp_path / "cache").rglob("*.features.arrow"))  # nothing half-written kept
