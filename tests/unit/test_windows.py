"""data.long_documents: windows: documents shorter than one window give exactly the truncated
features and predictions; a longer one gets several windows, each with the special tokens,
overlapping by the stated amount; one prediction per document is the softmax of its windows'
mean logits (evaluation and ``ftcli predict`` alike)."""

from __future__ import annotations

import pytest
import torch

from ftcli.data.tokenize import collate, tokenize
from ftcli.data.windows import by_document, overlap
from ftcli.evaluation.score import evaluate
from ftcli.forward import class_probabilities
from ftcli.recipe import recipe_from_mapping
from ftcli.serve.predictor import Predictor
from tests.conftest import _train_tokenizer

L = 16


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny BERT tokenizer and a random two-class BERT classifier (seconds)."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("bert-windows")
    tok = _train_tokenizer("bert", out)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.5,  # logits that differ from text to text
    )
    return tok, BertForSequenceClassification(cfg).eval()


def _recipe(policy: str):
    return recipe_from_mapping(
        {
            "name": "w",
            "task": "classification",
            "model": {"name": "unused"},
            "data": {"path": "x.csv", "max_length": L, "long_documents": policy},
            "method": {"kind": "lora"},
        }
    )


SHORT = [
    {"text": "the film was good", "label": "pos"},
    {"text": "a dull plot", "label": "neg"},
    {"text": "", "label": "neg"},
]
LONG = {"text": " ".join(f"the film was good and the plot {i}" for i in range(8)), "label": "pos"}
LABELS = {"neg": 0, "pos": 1}


def _core(f: dict) -> dict:
    return {k: f[k] for k in ("input_ids", "attention_mask", "labels")}


def test_short_documents_give_exactly_the_truncated_features(bert):
    tok, model = bert
    win = tokenize(SHORT, _recipe("windows"), tok, LABELS).features
    cut = tokenize(SHORT, _recipe("truncate"), tok, LABELS).features
    assert [_core(f) for f in win] == [_core(f) for f in cut]
    assert [f["doc"] for f in win] == [0, 1, 2]
    assert by_document(win) == cut  # one window each: nothing more than the truncated feature
    assert class_probabilities(model, by_document(win), tok.pad_token_id, 8, "cpu") == (
        class_probabilities(model, cut, tok.pad_token_id, 8, "cpu")
    )


def test_a_long_document_is_overlapping_windows_with_special_tokens(bert):
    tok, _ = bert
    full = tok(LONG["text"])["input_ids"][1:-1]  # the content, without [CLS] ... [SEP]
    assert len(full) > 3 * L
    feats = tokenize([SHORT[0], LONG], _recipe("windows"), tok, LABELS).features
    windows = [f for f in feats if f["doc"] == 1]
    assert len(windows) > 1 and all(f["labels"] == 1 for f in windows)
    body = []
    for f in windows:
        ids = f["input_ids"]
        assert len(ids) <= L and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        body.append(ids[1:-1])
    k = overlap(L)
    assert k == L // 4
    for a, b in zip(body, body[1:], strict=False):
        assert a[-k:] == b[:k]  # consecutive windows share overlap(max_length) tokens
    stitched = body[0] + [t for w in body[1:] for t in w[k:]]
    assert stitched == full  # together the windows read the whole document, nothing cut


def test_a_documents_prediction_is_the_softmax_of_its_windows_mean_logits(bert):
    tok, model = bert
    examples = [SHORT[0], LONG, SHORT[1]]
    feats = tokenize(examples, _recipe("windows"), tok, LABELS).features
    with torch.no_grad():
        per_window = model(
            **{k: v for k, v in collate(feats, tok.pad_token_id).items() if k != "labels"}
        ).logits
    expected = []
    for d in range(len(examples)):
        rows = per_window[[i for i, f in enumerate(feats) if f["doc"] == d]]
        expected.append(torch.softmax(rows.mean(0), -1).tolist())
    assert abs(expected[0][1] - expected[1][1]) > 1e-3  # texts the model tells apart
    docs = by_document(feats)
    assert len(docs) == 3 and len(docs[1]["more_windows"]) == sum(f["doc"] == 1 for f in feats) - 1
    got = class_probabilities(model, docs, tok.pad_token_id, 2, "cpu")
    assert sum(got, []) == pytest.approx(sum(expected, []), abs=1e-5)
    # the evaluation counts documents, not windows
    report = evaluate("classification", model, tok, feats, ["neg", "pos"], 4, "cpu")
    assert report.n == 3
    # ftcli predict / serve: the same one prediction per document
    pred = Predictor(
        model, tok, "classification", "t", {None: ["neg", "pos"]}, max_length=L, windows=True
    )
    out = pred.classify([e["text"] for e in examples], batch_size=2)
    flat = [p for o in out for p in (o["probs"]["neg"], o["probs"]["pos"])]
    assert flat == pytest.approx(sum(expected, []), abs=1e-5)
    cut = Predictor(model, tok, "classification", "t", {None: ["neg", "pos"]}, max_length=L)
    short = [e["text"] for e in SHORT[:2]]
    assert [o["probs"] for o in pred.classify(short)] == [o["probs"] for o in cut.classify(short)]
