"""``ftcli predict``, ``chat`` and ``serve``: a fine-tuned model put to use, on files, in the
terminal or over HTTP."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, TrustOpt, app, command
from ftcli.errors import FtcliError

ModelArg = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL_OR_RUN",
        help="Merged/model folder, run folder, adapter folder or model spec "
        "(with --adapter: the base; default: the adapters' own).",
    ),
]
AdapterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="Adapter folder or run (NAME=PATH to name it); repeat to serve several on one base.",
    ),
]
FeedbackOpt = Annotated[
    Path | None,
    typer.Option(
        "--feedback",
        help="Where verdicts go (JSON lines a recipe's data.path reads); "
        "bad answers without a fix go to <stem>-rejected.jsonl beside it.",
    ),
]


@app.command()
@command
def predict(
    model: ModelArg = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", help="Text to label or prompt to answer (repeatable)."),
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="JSONL/CSV/... file with a text column (or messages); "
            "an 'adapter' column picks the adapter per row.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Write predictions here (.jsonl or .csv).")
    ] = None,
    adapter: AdapterOpt = None,
    text_column: Annotated[str, typer.Option(help="Column of --input holding the text.")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 32,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Causal LMs: tokens to generate per answer.")
    ] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Causal LMs: 0 = greedy.")] = 0.0,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="Causal LMs: continue the text as is, without the chat template."
        ),
    ] = False,
    review: Annotated[
        bool,
        typer.Option(
            "--review", help="After predicting, mark each answer /good, /bad or /fix ANSWER."
        ),
    ] = False,
    feedback: FeedbackOpt = None,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Label texts (with probabilities) or generate answers with a fine-tuned model, batched.

    [bold]Examples[/]

      ftcli predict runs/quickstart --text "A gorgeous, moving film." --text "Dull and far too long."

      ftcli predict out/quickstart-merged --input reviews.csv --output predictions.jsonl

      ftcli predict --adapter runs/a --adapter runs/b --text "..."     [dim]# one base, both adapters[/]

      ftcli predict runs/quickstart --input new.jsonl --review --feedback feedback.jsonl
    """
    from ftcli.serve import batch
    from ftcli.serve.chat import review_predictions
    from ftcli.serve.predictor import load_predictor
    from ftcli.ui import UI

    ui = UI(json_)
    requests = batch.read_requests(text, input_, text_column)
    pred = load_predictor(model, adapter)
    total = batch.progress_total(requests, pred)
    bar, advance = batch.progress_bar(ui.console, total, "predict")
    with bar:
        rows = batch.predict(pred, requests, batch_size, max_new_tokens, temperature, raw, advance)
    if output:
        batch.write_predictions(rows, output)
        ui.info(f"{len(rows)} predictions -> {output}")
    batch.show_predictions(ui, pred, rows, output)
    result: dict = {"model": pred.source, "task": pred.task, "count": len(rows)}
    if review:
        out = sys.stderr if json_ else sys.stdout
        result |= review_predictions(pred, rows, feedback, sys.stdin, out, ui)
    if output:
        result["output"] = str(output)
    else:
        result["predictions"] = rows
    return result


@app.command()
@command
def chat(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL_OR_RUN",
            help="Merged/model folder, run folder, adapter folder or model spec "
            "(with --adapter: the base).",
        ),
    ] = None,
    adapter: AdapterOpt = None,
    system: Annotated[
        str | None,
        typer.Option(
            help="System prompt for the conversation (default: the run's data.system_prompt; "
            "--system '' for none)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    feedback: Annotated[
        Path | None,
        typer.Option(
            "--feedback",
            help="Where /good and /fix answers go (a recipe's data.path reads it; default: "
            "feedback.jsonl in the run's folder, else here); /bad ones go to <stem>-rejected.jsonl.",
        ),
    ] = None,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Talk to a causal LM in the terminal, with its chat template; answers stream as they are made.

    Commands: /good, /bad, /fix ANSWER (feedback on the last answer), /switch NAME and /adapters
    (with several --adapter), /reset, /help, /quit. Ctrl-C stops an answer; a second Ctrl-C leaves.

    [bold]Examples[/]

      ftcli chat runs/smollm2-chat

      ftcli chat --adapter polite=runs/a --adapter terse=runs/b --system "You are helpful."
    """
    from ftcli.serve.chat import chat_loop, chat_run, run_system_prompt
    from ftcli.serve.feedback import FeedbackLog
    from ftcli.serve.predictor import load_predictor
    from ftcli.ui import UI

    ui = UI(json_)
    run_dir = chat_run(model, adapter)
    with ui.status(f"loading {model or ', '.join(adapter or [])} ..."):
        pred = load_predictor(model, adapter)
    if system is None:
        system = run_system_prompt(run_dir)
    log = FeedbackLog(feedback or (run_dir or Path()) / "feedback.jsonl", pred.source)
    return chat_loop(
        pred,
        sys.stdin,
        sys.stderr if json_ else sys.stdout,
        log,
        system or None,
        max_new_tokens,
        temperature,
    )


@app.command()
@command
def serve(
    model: ModelArg = None,
    adapter: AdapterOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="FTCLI_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/ (default: no key).",
        ),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most waiting requests of one adapter run together.")
    ] = 8,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Most requests waiting; more get 429 (retry).")
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Most tokens one answer may ask for (max_tokens).")
    ] = 256,
    max_body: Annotated[
        int, typer.Option(min=1, help="Largest request body in bytes; more get 413.")
    ] = 1_000_000,
    feedback: Annotated[
        Path | None,
        typer.Option(
            "--feedback",
            help="Turn on POST /v1/feedback, writing to this file (the rows chat writes; "
            "bad answers go to <stem>-rejected.jsonl). Off by default.",
        ),
    ] = None,
    feedback_max_rows: Annotated[
        int, typer.Option(min=1, help="Most rows in the feedback files; more get 507.")
    ] = 10_000,
    max_prompts: Annotated[
        int, typer.Option(min=1, help="Most prompts (or inputs) in one request.")
    ] = 16,
    max_prompt_chars: Annotated[
        int, typer.Option(min=1, help="Longest prompt in characters; longer get 413.")
    ] = 100_000,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds a request may wait and run; then 504.")
    ] = 300.0,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Serve a fine-tuned model over an OpenAI-compatible HTTP API, adapters picked per request.

    Endpoints: POST /v1/chat/completions (stream or not), /v1/completions, /v1/classify,
    /v1/feedback; GET /v1/models, /health. The request's model field picks the adapter (or
    the base); requests for one adapter are batched. Needs the serve extra: pip install 'ftcli\\[serve]'.

    [bold]Examples[/]

      ftcli serve runs/smollm2-chat-lora

      ftcli serve --adapter polite=runs/a --adapter terse=runs/b --port 8080 --api-key "$KEY"
    """
    try:
        from ftcli.serve.server import ServeConfig
        from ftcli.serve.server import serve as run_server
    except ImportError as exc:
        raise FtcliError(
            f"ftcli serve needs {exc.name or 'fastapi and uvicorn'}",
            hint="pip install 'ftcli[serve]'",
        ) from None
    from ftcli.ui import UI

    ui = UI(json_)
    limits = (feedback_max_rows, max_prompts, max_prompt_chars, timeout)
    cfg = ServeConfig(
        host, port, api_key, max_batch_size, max_queue, max_tokens, max_body, feedback, *limits
    )
    return run_server(model, adapter, cfg, say=ui.info)
