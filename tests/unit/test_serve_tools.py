"""``serve`` takes ``tools`` on a chat request where the model's chat template writes them into
the prompt (the shipped qwen template does), and answers 400 where it would drop them."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("fastapi")

from tests.unit.test_serve_app import serving  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "adds two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]
CALLED = [
    {"role": "user", "content": "what is 2 plus 2 ?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
]


# ChatML that names the tools in a system turn and renders tool calls and results: short, for
# the tiny model's 256 positions (the shipped qwen template's tool prompt is longer)
TOOLED = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}{% for c in m['tool_calls'] or [] %}call {{ c['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def preds(tiny_models):
    from ftcli.serve.predictor import load_predictor

    chatml = load_predictor(str(tiny_models["llama"]))
    tooled = load_predictor(str(tiny_models["llama"]))
    tooled.tokenizer = copy.deepcopy(tooled.tokenizer)
    tooled.tokenizer.chat_template = TOOLED
    return {"chatml": chatml, "tooled": tooled}


def _ask(c, model, messages, **extra):
    return c.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": 3, **extra},
    )


def test_tools_are_rendered_into_the_prompt_where_the_template_writes_them(preds):
    from ftcli.data.chat import render_chat, renders_tools

    pred = preds["tooled"]
    assert renders_tools(pred.tokenizer) and not renders_tools(preds["chatml"].tokenizer)
    with serving(pred) as (c, served):
        plain = _ask(c, served.model, CALLED[:1])
        tooled = _ask(c, served.model, CALLED, tools=TOOLS)
    assert plain.status_code == 200 and tooled.status_code == 200, tooled.text
    want = render_chat(pred.tokenizer, CALLED, True, tools=TOOLS)
    assert "tools: add" in want and "call add" in want and "<|im_start|>tool\n4" in want
    n = len(pred.tokenizer(want, add_special_tokens=False)["input_ids"])
    assert tooled.json()["usage"]["prompt_tokens"] == n  # the tools and the calls were sent
    assert n > plain.json()["usage"]["prompt_tokens"]


def test_tools_a_template_would_drop_are_refused(preds):
    with serving(preds["chatml"]) as (c, served):
        r = _ask(c, served.model, CALLED[:1], tools=TOOLS)
        assert r.status_code == 400
        assert "chat template does not render them" in r.json()["error"]["message"]
        done = c.post(
            "/v1/completions", json={"model": served.model, "prompt": "hi", "tools": TOOLS}
        )
        assert done.status_code == 400


def test_the_shipped_qwen_template_renders_tools_calls_and_results():
    import tempfile

    from ftcli.data.chat import render_chat, renders_tools, template_text
    from tests.conftest import _train_tokenizer

    tok = _train_tokenizer("bpe", tempfile.mkdtemp())
    tok.chat_template = template_text("qwen")
    assert renders_tools(tok)
    text = render_chat(tok, CALLED, True, tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>" in text
    # without tools it is the ChatML-with-a-system-turn it always was
    assert render_chat(tok, CALLED[:1], True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwhat is 2 plus 2 ?<|im_end|>\n<|im_start|>assistant\n"
    )
