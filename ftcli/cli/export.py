"""``ftcli export``: the merged model as a GGUF file for llama.cpp / Ollama, checked by llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, app, command


@app.command()
@command
def export(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN", help="Run folder holding merged/ (or a merged folder itself)."
        ),
    ],
    format_: Annotated[
        str,
        typer.Option("--format", help="gguf | ollama (the GGUF and a Modelfile beside it)."),
    ] = "gguf",
    quant: Annotated[str, typer.Option(help="f16 | q8_0 | q4_k_m.")] = "f16",
    out: Annotated[
        Path | None,
        typer.Option(help="The .gguf file to write (default: RUN/export/<run>-<quant>.gguf)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
    json_: JsonOpt = False,
):
    """Write the run's merged model as one GGUF file (weights, tokenizer, chat template), then check
    it with llama.cpp's own runtime against merged/ in transformers.

    The check runs on the run's sealed test examples: llama.cpp must tokenize them identically,
    give each next token a log-probability within the quant type's tolerance, continue prompts
    greedily the same way (near-ties aside), and render the stored chat template exactly as the
    tokenizer does. A failed check writes nothing. Llama-family models (SmolLM2, Llama 2) with
    byte-level BPE tokenizers; needs llama-cpp-python (pip install 'ftcli\\[export]').

    [bold]Examples[/]

      ftcli export runs/smollm2-chat-lora --quant q8_0

      ftcli export runs/smollm2-chat-lora --format ollama --quant q4_k_m --out out/chat.gguf
    """
    from ftcli.export import check_choices, summary_rows
    from ftcli.export import export as do_export
    from ftcli.ui import UI

    check_choices(format_, quant)
    ui = UI(json_)
    ui.step(f"export   {run} -> {format_} {quant}")
    r = do_export(run, fmt=format_, quant=quant, out=out, force=force)
    ui.table(f"exported -> {r.path} (checked with llama.cpp)", summary_rows(r))
    return r.as_dict()
