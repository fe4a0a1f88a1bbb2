"""data.chat_template travels with the model: a run trained on a named template saves it in
adapter/ and merged/, and predict (in process) and serve (a real server, the openai client) render
prompts with it, not with the base model's own template."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import tiny_recipe
from tests.integration.test_serve import Server

PROMPT = [{"role": "user", "content": "what is 3 plus 4 ?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models, tiny_data):
    from ftcli.pipeline import train_run
    from ftcli.recipe import recipe_from_mapping
    from ftcli.ui import UI

    root = tmp_path_factory.mktemp("template-run")
    m = tiny_recipe(root, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama")
    m["data"]["chat_template"] = "plain"  # the tiny base's own template is ChatML
    m["train"].update(max_steps=4)
    m["merge"] = {"enabled": True}
    r = recipe_from_mapping(m)
    train_run(r, UI())
    return r.run_dir


def _template():
    from ftcli.data.chat import template_text

    return template_text("plain")


def test_the_template_is_saved_with_the_adapter_and_the_merged_model(run):
    from ftcli.models import tokenizer_from

    for folder in ("adapter", "merged"):
        tok = tokenizer_from(run / folder)
        assert tok.chat_template == _template(), folder


def test_predict_renders_with_the_trained_template(run):
    from ftcli.serve.predictor import load_predictor

    for target in (run, run / "merged"):
        pred = load_predictor(str(target))
        text = pred.prompt_text(PROMPT)
        assert text == "### User:\nwhat is 3 plus 4 ?\n\n### Assistant:\n", text
        assert "<|im_start|>" not in text


def test_serve_renders_with_the_trained_template(run, tmp_path):
    from ftcli.serve.predictor import load_predictor

    pred = load_predictor(str(run))
    want = len(pred.tokenizer(pred.prompt_text(PROMPT), add_special_tokens=False)["input_ids"])
    chatml = len(
        pred.tokenizer(
            "<|im_start|>user\nwhat is 3 plus 4 ?<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )["input_ids"]
    )
    assert want != chatml  # the prompt's length tells the templates apart
    server = Server(["--adapter", f"a={run}", "--max-tokens", "8"], tmp_path)
    try:
        server.wait()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        r = client.chat.completions.create(model="a", messages=PROMPT, max_tokens=6)
        assert r.usage.prompt_tokens == want
        assert r.choices[0].message.content.strip() == pred.generate([PROMPT], max_new_tokens=6)[0]
    finally:
        server.stop()
