"""``ftcli prepare`` and ``ftcli cache``: the data stage on its own, and the data cache it fills."""

from __future__ import annotations

from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, RecipeArg, SetOpt, app, command, load_recipe_arg


@app.command()
@command
def prepare(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False):
    """Run only the data stage: read, split, clean and tokenize into the data cache.

    Loads the tokenizer, never the model's weights, and prints the data table and the cache
    key. A later ``ftcli train`` (or tune trial, or cv fold) of the same data says "cached" and
    skips the work: prepare on a CPU node before the GPUs start.

    [bold]Examples[/]

      ftcli prepare recipes/quickstart.yaml

      ftcli prepare my.yaml --set data.max_length=512 --json
    """
    from ftcli.data.chat import recipe_tokenizer
    from ftcli.data.examples import SPLITS
    from ftcli.data.lengths import with_data_length
    from ftcli.data.prepared import data_table
    from ftcli.data.store import load_cached, load_data, reading_ahead
    from ftcli.sources import trusting
    from ftcli.ui import UI

    ui = UI(json_)
    r = load_recipe_arg(recipe, set_)
    for w in r.warnings:
        ui.warn(w.render())
    ui.step(f"prepare  {r.data.where}")
    if r.data.augment and r.data.augment.paraphrase:
        ui.warn(
            "data.augment.paraphrase is not cached (a model writes those copies on each run): "
            "this prepares and shows the data without them, and `ftcli train` does not reuse it"
        )
        augment = r.data.augment.model_copy(update={"paraphrase": None})
        r = r.model_copy(update={"data": r.data.model_copy(update={"augment": augment})})
    found = load_cached(r, ui)  # a hit needs no tokenizer (loading one is most of the time)
    if found is not None:
        prepared, tokenized, note = found
    else:
        with trusting(r.model.trust_remote_code), reading_ahead(r):
            tokenizer, _, model_dir = recipe_tokenizer(r)
            prepared, tokenized, note = load_data(r, tokenizer, model_dir, None, ui)
    ui.info(f"  {note}")
    r = with_data_length(r, prepared, ui)
    ui.table("data", data_table(prepared, tokenized, r.data.max_length))
    for line in prepared.stats.get("notes", []):
        ui.warn(line)
    # "cached KEY" / "prepared KEY: why"; a streamed recipe has no entry (nothing is cached)
    key = note.split()[1].rstrip(":") if note.startswith(("cached ", "prepared ")) else None
    return {
        "name": r.name,
        "key": key,
        "cached": note.startswith("cached"),
        "note": note,
        "data": {s: tokenized[s].record() for s in SPLITS},
        "labels": prepared.labels,
    }


@app.command()
@command
def cache(
    clear_: Annotated[
        bool,
        typer.Option(
            "--clear",
            help="Delete ftcli's data cache entries (only folders ftcli made there; an entry "
            "being built is left alone).",
        ),
    ] = False,
    json_: JsonOpt = False,
):
    """Show the data cache (its folder, each entry's key, source, size and date, the total), or
    clear it with --clear.

    The cache is <FTCLI_CACHE or ~/.cache/ftcli>/data. Only folders ftcli made there are listed
    as entries and deleted; anything else is named and left alone.

    [bold]Examples[/]

      ftcli cache

      ftcli cache --clear
    """
    from ftcli.data.store import clear, data_cache_dir, list_entries
    from ftcli.ui import UI
    from ftcli.util import human_bytes

    ui = UI(json_)
    root = data_cache_dir()
    if clear_:
        removed, freed, kept = clear(root)
        ui.info(
            f"cleared {removed} entr{'y' if removed == 1 else 'ies'} ({human_bytes(freed)}) from {root}"
        )
        for name in kept:
            ui.info(f"  left alone: {name}")
        return {"folder": str(root), "removed": removed, "freed_bytes": freed, "left_alone": kept}
    entries, others = list_entries(root)
    total = sum(e["size"] for e in entries)
    ui.info(f"data cache: {root}")
    damaged = any(e["damaged"] for e in entries)
    ui.table(
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)}",
        [
            (e["key"][:12], human_bytes(e["size"]), e["created"], e["source"])
            + ((f"damaged: {e['damaged']}" if e["damaged"] else "",) if damaged else ())
            for e in entries
        ],
        headers=("key", "size", "created", "source") + (("",) if damaged else ()),
        whole=(0, 1, 2),
    )
    for name in others:
        ui.info(f"  not ftcli's (left alone): {name}")
    return {
        "folder": str(root),
        "entries": entries,
        "total_bytes": total,
        "not_ftclis": others,
    }
