"""Where each recipe key came from: the file and line of every dotted key (or the ``--set`` that set
it), read from the YAML node tree, which also shows duplicate keys and alias bombs that
``yaml.safe_load`` would hide."""

from __future__ import annotations

import yaml

from ftcli.errors import Problem, RecipeError


class RecipeOrigin:
    """Maps dotted keys to the file and line they came from (or to the ``--set`` that set them)."""

    def __init__(
        self,
        file: str,
        lines: dict[tuple[str, ...], int],
        overridden: set[tuple[str, ...]],
        files: dict[tuple[str, ...], str] | None = None,
    ):
        self.file = file
        self.lines = lines
        self.overridden = overridden
        self.files = files or {}  # keys an ``extends:`` parent set -> its file

    def locate(self, path: tuple[str, ...]) -> tuple[str, int | None]:
        for i in range(len(path), 0, -1):
            if path[:i] in self.overridden:
                return "--set", None
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.files.get(path[:i], self.file), self.lines[path[:i]]
        return self.file, None

    def problem(self, key: str, message: str, hint: str | None = None) -> Problem:
        file, line = self.locate(tuple(key.split("."))) if key else (self.file, None)
        return Problem(message, key=key, file=file, line=line, hint=hint)


MAX_NODES = 20_000  # a recipe has a few hundred values; YAML aliases can make billions


def _check_size(root: yaml.Node, file: str) -> None:
    """Refuse a document that expands past MAX_NODES values (aliases of aliases: the
    "billion laughs" shape) before anything walks it."""
    seen, stack = 0, [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise RecipeError(
                [
                    Problem(
                        f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases "
                        "nested in aliases?)",
                        file=file,
                        hint="write the values out, or use fewer nested &anchors / *aliases",
                    )
                ]
            )
        if isinstance(node, yaml.MappingNode):
            stack.extend(v for kv in node.value for v in kv)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _node_lines(
    node: yaml.Node, prefix: tuple[str, ...], out: dict, problems: list[Problem], file: str
):
    """Record the line of every mapping key; flag duplicate keys, which safe_load would hide."""
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            dotted = ".".join((*prefix, key))
            if key in seen:
                problems.append(
                    Problem(
                        f"duplicate key (first set on line {seen[key]}); YAML would silently keep the last",
                        key=dotted,
                        file=file,
                        line=line,
                        hint="remove one of them",
                    )
                )
            seen[key] = line
            _node_lines(value_node, (*prefix, key), out, problems, file)
            out[(*prefix, key)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*prefix, str(i)), out, problems, file)
