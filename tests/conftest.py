"""Shared fixtures: tiny models and tokenizers built in the test session, tiny datasets, recipes.

Nothing here touches the network: the hub is switched off before anything imports it, and the
models are built from configs with random weights (seconds on a CPU).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "lovely",
    "superb",
    "brilliant",
    "delightful",
]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "dreadful", "tedious"]
FILLER = [
    "the",
    "film",
    "movie",
    "was",
    "plot",
    "acting",
    "really",
    "quite",
    "story",
    "and",
    "a",
    "very",
]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable two-class dataset: the sentiment word decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        word = rng.choice(POSITIVE if pos else NEGATIVE)
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(len(words) + 1), word)
        rows.append({"text": " ".join(words) + f" {i}", "label": "pos" if pos else "neg"})
    return rows


def chat_recipe(path, **data):
    """A causal-LM recipe over the chat jsonl at ``path`` (its ``messages`` column); ``data``
    adds or replaces data keys."""
    from ftcli.recipe import recipe_from_mapping

    return recipe_from_mapping(
        {
            "name": "t",
            "task": "causal_lm",
            "model": {"name": "m"},
            "data": {"path": str(path), "messages_column": "messages", **data},
            "method": {"kind": "full"},
        }
    )


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what is {a} plus {b} ?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b} ."},
                ]
            }
        )
    return rows


def _train_tokenizer(kind: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (
        [r["text"] for r in sentiment_rows(400)]
        + [m["content"] for r in chat_rows(200) for m in r["messages"]]
        + ["hello there how are you today", "what is the capital of france ? paris"]
    )
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(
            corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
        )
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[
                ("[CLS]", tok.token_to_id("[CLS]")),
                ("[SEP]", tok.token_to_id("[SEP]")),
            ],
        )
        tok.decoder = decoders.WordPiece()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            corpus,
            trainers.BpeTrainer(
                vocab_size=400,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
        fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_tiny_model(kind: str, out: Path) -> Path:
    """A randomly initialised model of the named architecture, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    tok = _train_tokenizer("bert" if kind == "bert" else "bpe", out)
    v = len(tok)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=v,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
        )
        model = BertModel(cfg)  # with its pooler, as pre-trained BERT checkpoints have
    elif kind in ("llama", "llama-random"):
        cfg = LlamaConfig(
            vocab_size=v,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "gpt2":
        # GPT2Config defaults bos/eos to 50256: set them (docs/traps.md#gpt-2-config-token-ids)
        cfg = GPT2Config(
            vocab_size=v,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        raise ValueError(kind)
    if kind in ("llama", "gpt2"):
        _pretrain(model, tok)
    model.save_pretrained(out)
    return out


def _pretrain(model, tok, steps: int = 150) -> None:
    """A few seconds of language-model training on plain sentences, so the tiny decoder starts from
    real token statistics (as a pre-trained base does) rather than noise: LoRA adapts a base, it
    cannot build one from random weights."""
    import torch

    rng = random.Random(1)
    lines = [r["text"] for r in sentiment_rows(300, seed=1)]
    for _ in range(300):
        a, b = rng.randrange(10), rng.randrange(10)
        lines.append(rng.choice([f"what is {a} plus {b} ?", f"{a} plus {b} is {a + b} ."]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = tok(rng.sample(lines, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # "llama" and "gpt2" get a few seconds of pre-training (LoRA adapts a base; it cannot build one);
    # "llama-random" keeps random weights, which suits the toy classification task.
    return {k: build_tiny_model(k, root / k) for k in ("bert", "llama", "llama-random", "gpt2")}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    import csv

    root = tmp_path_factory.mktemp("data")
    cls = root / "sentiment.csv"
    with open(cls, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(sentiment_rows(240))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(160)))
    return {"classification": cls, "chat": chat}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path_factory.getbasetemp() / "ftcli-cache"))


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_recipe(
    tmp_path: Path,
    tiny_models,
    tiny_data,
    task: str = "classification",
    kind: str = "lora",
    arch: str | None = None,
    **overrides,
) -> dict:
    """A small, fast recipe mapping; ``overrides`` replace whole top-level sections."""
    arch = arch or ("bert" if task == "classification" else "llama")
    method: dict = {"kind": kind}
    if kind != "full":
        targets = {"bert": ["query", "value"], "gpt2": ["c_attn"]}.get(arch, ["q_proj", "v_proj"])
        method.update(r=4, alpha=8, dropout=0.0, target_modules=targets)
    if kind == "qlora":
        method["quantization"] = {"compute_dtype": "float32"}
    if task == "classification":
        data = {
            "path": str(tiny_data["classification"]),
            "text_column": "text",
            "label_column": "label",
            "split": {"validation": 0.1, "test": 0.2, "seed": 0},
            "max_length": 32,
        }
    else:
        data = {
            "path": str(tiny_data["chat"]),
            "messages_column": "messages",
            "split": {"validation": 0.1, "test": 0.2, "seed": 0},
            "max_length": 64,
        }
    recipe = {
        "name": f"tiny-{task}-{kind}-{arch}",
        "task": task,
        "model": {"name": str(tiny_models[arch])},
        "data": data,
        "method": method,
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "optimizer": {"name": "adamw", "lr": 5.0e-3},
            "scheduler": {"name": "constant"},
            "log_every": 2,
            "seed": 0,
            # float32 everywhere: `auto` means bf16 on CPUs with native bf16 (some dev machines,
            # not others), and these tests compare logits to 1e-4 across runs and machines
            "mixed_precision": "no",
        },
        "eval": {"batch_size": 32},
        "merge": {"enabled": kind != "full"},
        "output_dir": str(tmp_path / "runs"),
    }
    recipe.update(overrides)
    return recipe


# --------------------------------------------------------------------------- helpers shared by test modules

FAST = ["--resamples", "999"]


def run_cli(capsys, *args: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exc:
        from ftcli.cli import main

        main([*args, "--json"])
    out = capsys.readouterr().out
    return exc.value.code, json.loads(out)


_RUNS: dict = {}


def trained_run(
    tmp_path_factory,
    tiny_models,
    tiny_data,
    task: str,
    kind: str,
    seed: int = 0,
    lr: float = 1.0e-2,
) -> Path:
    """A short real training run (cached for the session): enough steps to move every weight."""
    from ftcli.pipeline import train_run
    from ftcli.recipe import recipe_from_mapping
    from ftcli.ui import UI

    key = (task, kind, seed, lr)
    if key not in _RUNS:
        root = tmp_path_factory.mktemp(f"run-{task}-{kind}-{seed}")
        m = tiny_recipe(root, tiny_models, tiny_data, task=task, kind=kind, arch="llama")
        m["name"] = f"{task}-{kind}-{seed}"
        m["train"].update(max_steps=6, seed=seed, optimizer={"name": "adamw", "lr": lr})
        m["merge"] = {"enabled": False}
        r = recipe_from_mapping(m)
        train_run(r, UI())
        _RUNS[key] = r.run_dir
    return _RUNS[key]
