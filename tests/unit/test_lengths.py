"""data.max_length: auto: the chosen value on a fixed length distribution (percentile, rounding to
the padding multiple, the floor, the cap by the model's positions and by train.batch_tokens, the
share truncated), explicit values winning, and the recipe errors at their key."""

from __future__ import annotations

import pytest

from ftcli.data.lengths import FLOOR, SAMPLE, choose, percentile, resolve
from ftcli.data.tokenize import PAD_MULTIPLE
from ftcli.errors import RecipeError
from ftcli.recipe import recipe_from_mapping
from tests.conftest import _train_tokenizer


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """The tiny BERT tokenizer and a config (no weights): all the auto rule reads."""
    from transformers import BertConfig

    out = tmp_path_factory.mktemp("bert-config")
    tok = _train_tokenizer("bert", out)
    BertConfig(vocab_size=len(tok), hidden_size=32, max_position_embeddings=128).save_pretrained(
        out
    )
    return out, tok


def _recipe(folder, **data):
    return recipe_from_mapping(
        {
            "name": "auto",
            "task": "classification",
            "model": {"name": str(folder)},
            "data": {"path": "x.csv", **data},
            "method": {"kind": "lora"},
        }
    )


def _docs(lengths: list[int]) -> list[dict]:
    """Examples whose BERT token length is exactly n: [CLS] + (n - 2) x 'good' + [SEP]."""
    return [{"text": " ".join(["good"] * (n - 2)), "label": "pos"} for n in lengths]


def test_percentile_is_nearest_rank():
    lengths = list(range(1, 1001))
    assert percentile(lengths, 99) == 990
    assert percentile(lengths, 100) == 1000
    assert percentile([7], 99) == 7


def test_choose_rounds_up_to_the_padding_multiple_and_reports_the_share_cut():
    c = choose(list(range(1, 1001)), sampled=False, limit=None)
    assert c.value == 992 and c.value % PAD_MULTIPLE == 0  # p99 = 990, rounded up to 8
    assert c.truncates == pytest.approx(8 / 1000)
    assert c.line() == "max_length auto: 992 (p99 of all 1,000 training examples; truncates 0.8%)"


def test_choose_keeps_a_floor_and_caps_by_positions_and_batch_tokens():
    assert choose([3] * 100, False, None).value == FLOOR
    capped = choose(list(range(1, 1001)), False, limit=512)
    assert capped.value == 512 and "the model's 512 positions" in capped.line()
    assert capped.truncates == pytest.approx(488 / 1000)
    by_budget = choose(list(range(1, 1001)), False, limit=None, batch_tokens=256)
    assert by_budget.value == 256 and "train.batch_tokens" in by_budget.line()


def test_auto_on_real_token_lengths(bert_folder):
    folder, tok = bert_folder
    # 95 short examples of 20 tokens and 5 of 60: the 99th percentile is 60 -> 64
    docs = _docs([20] * 95 + [60] * 5)
    assert [len(tok(d["text"])["input_ids"]) for d in docs[:1] + docs[-1:]] == [20, 60]
    resolved, choice = resolve(_recipe(folder), docs, tok, {"pos": 0})
    assert resolved.data.max_length == choice.value == 64
    assert choice.policy == "auto" and choice.examples == 100 and not choice.sampled
    assert choice.truncates == 0.0 and choice.position_limit == 128
    assert "p99 of all 100 training examples; truncates 0.0%" in choice.line()
    # 3 of 100 at 60 tokens: p99 is 60 still; 1 of 100: p99 is the short ones' 20 -> 24, and
    # the one long example is the 1% it truncates
    _, one = resolve(_recipe(folder), _docs([20] * 99 + [60]), tok, {"pos": 0})
    assert one.value == max(FLOOR, 24) and one.truncates == pytest.approx(0.01)


def test_auto_is_capped_by_the_models_positions(bert_folder):
    folder, tok = bert_folder
    _, choice = resolve(_recipe(folder), _docs([200] * 10), tok, {"pos": 0})
    assert choice.value == 128 and choice.truncates == 1.0  # config: 128 positions
    assert "capped by the model's 128 positions" in choice.line()


def test_big_corpora_are_sampled_with_a_fixed_seed(bert_folder):
    folder, tok = bert_folder
    docs = _docs([10 + i % 7 for i in range(SAMPLE + 500)])
    _, a = resolve(_recipe(folder), docs, tok, {"pos": 0})
    _, b = resolve(_recipe(folder), docs, tok, {"pos": 0})
    assert a == b and a.sampled and a.examples == SAMPLE
    assert f"p99 of {SAMPLE:,} training examples, a seeded sample" in a.line()


def test_an_explicit_max_length_wins(bert_folder):
    folder, tok = bert_folder
    recipe = _recipe(folder, max_length=48)
    resolved, choice = resolve(recipe, _docs([100] * 10), tok, {"pos": 0})
    assert resolved is recipe and choice.value == 48 and choice.policy == "explicit"


def test_auto_is_the_default_and_the_written_recipe_holds_the_number(bert_folder):
    folder, tok = bert_folder
    recipe = _recipe(folder)
    assert recipe.data.max_length == "auto"
    resolved, _ = resolve(recipe, _docs([20] * 10), tok, {"pos": 0})
    assert "max_length: 32\n" in resolved.to_yaml()
    assert "max_length: auto" not in resolved.to_yaml()


@pytest.mark.parametrize(
    "value, says",
    [
        (0, "at least 1 token"),
        (True, "not true/false"),
        ("longest", "auto or a whole number"),
        (2_000_000, "less than or equal to 1048576"),
    ],
)
def test_bad_max_length_is_refused_at_its_key(bert_folder, value, says):
    with pytest.raises(RecipeError) as exc:
        _recipe(bert_folder[0], max_length=value)
    assert "data.max_length" in str(exc.value) and says in str(exc.value)


def test_windows_on_a_causal_lm_is_a_recipe_error_at_its_key(bert_folder):
    with pytest.raises(RecipeError) as exc:
        recipe_from_mapping(
            {
                "name": "w",
                "task": "causal_lm",
                "model": {"name": str(bert_folder[0])},
                "data": {"path": "x.jsonl", "long_documents": "windows"},
                "method": {"kind": "lora"},
            }
        )
    assert "data.long_documents" in str(exc.value) and "classification" in str(exc.value)
