"""``ftcli merge``: fold an adapter into its base, verified, as a plain transformers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, TrustOpt, app, command


@app.command()
@command
def merge(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_OR_TRAINED_DIR",
            help="Adapter folder, or a run folder (adapter/ or, for full fine-tuning, model/).",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write the merged model (a new folder).")
    ],
    base: Annotated[
        str | None,
        typer.Option(help="Base model to merge into (default: the one the adapter records)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="float32 | bfloat16 | float16 for the saved weights.")
    ] = "float32",
    into: Annotated[
        str,
        typer.Option(
            help="QLoRA: dequantized (the NF4 weights training saw) | original (full precision)."
        ),
    ] = "dequantized",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Fold a LoRA adapter into its base model, verify the result, write a plain transformers folder.

    The merged model and base + adapter are run on the same inputs (the run's test examples, else
    built-in text): the fold is checked in float32, the written folder is loaded back with plain
    transformers in its dtype and checked again. Above the tolerance it fails (exit 1) and writes
    nothing. A full fine-tuning run is exported in --dtype and checked the same way.

    [bold]Examples[/]

      ftcli merge runs/quickstart out/quickstart-merged

      ftcli merge runs/smollm2-qlora/adapter out/smol --into original --dtype bfloat16

      ftcli merge my-adapter/ out/m --base HuggingFaceTB/SmolLM2-135M-Instruct --force --json
    """
    from ftcli.merge import check_choices, summary_rows
    from ftcli.merge import merge as do_merge
    from ftcli.ui import UI

    check_choices(dtype, into, flag="--")
    ui = UI(json_)
    ui.step(f"merge    {source} -> {out_dir}")
    m = do_merge(source, out_dir, base=base, dtype=dtype, into=into, force=force)
    ui.table(f"merged -> {m.out_dir} (verified)", summary_rows(m))
    return m.as_dict()
