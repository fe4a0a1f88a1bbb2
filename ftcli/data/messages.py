"""Chat messages as ftcli's examples hold them: role and content, and the fields a message may
carry besides (an assistant turn's ``reasoning_content`` and ``tool_calls``, a tool turn's
``tool_call_id`` and ``name``). Read from any source layout once (``chat_message``), one shape
after that; ``for_template`` gives them back as chat templates read them."""

from __future__ import annotations

import json

from ftcli.errors import DataError

# What a message may carry besides role and content. In examples (and the prepared Arrow files)
# ``tool_calls`` is JSON text, so every message has one shape; ``for_template`` decodes it.
EXTRA_FIELDS = ("reasoning_content", "tool_calls", "tool_call_id", "name")


def _listish(value):
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _tool_call(call, where: str) -> dict:
    """One tool call as chat templates read it: {type, function: {name, arguments}} (arguments a
    mapping where the text is a JSON object: templates write it with ``tojson``)."""
    f = call.get("function") if isinstance(call, dict) else None
    f = f if isinstance(f, dict) else call
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(
            f"{where}: each tool call needs a function name",
            hint='for example {"type": "function", "function": {"name": "get_weather", '
            '"arguments": {"city": "Paris"}}}',
        )
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else args
    out = {
        "type": "function",
        "function": {"name": name, "arguments": {} if args is None else args},
    }
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def chat_message(m: dict, where: str, text) -> dict:
    """A source message as an example holds it: role and content (``text``: how a value becomes
    text), and the extra fields it has (None and empty ones left out), ``tool_calls`` as JSON
    text. Reasoning and tool calls belong to assistant turns: elsewhere they are a DataError."""
    if len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str:
        return {"role": m["role"], "content": m["content"]}  # the common case, kept fast
    out = {"role": str(m["role"]), "content": text(m.get("content"))}
    reasoning = m.get("reasoning_content")
    if reasoning is not None and text(reasoning):
        out["reasoning_content"] = text(reasoning)
    calls = _listish(m.get("tool_calls"))
    if calls:
        if not isinstance(calls, list):
            raise DataError(f"{where}: tool_calls must be a list of calls")
        out["tool_calls"] = json.dumps(
            [_tool_call(c, where) for c in calls], ensure_ascii=False, separators=(",", ":")
        )
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None and text(m[k]):
            out[k] = text(m[k])
    if out["role"] != "assistant" and ("reasoning_content" in out or "tool_calls" in out):
        raise DataError(
            f"{where}: a {out['role']} message carries "
            + " and ".join(k for k in ("reasoning_content", "tool_calls") if k in out),
            hint="reasoning and tool calls belong to assistant messages; a call's result is a "
            "message of role tool",
        )
    return out


def without_nulls(messages: list[dict]) -> list[dict]:
    """The messages as read back from Arrow, where every message has every field (null where it
    has none): each without its nulls, so it compares and renders as written."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def for_template(messages: list[dict]) -> list[dict]:
    """The messages as a chat template reads them: ``tool_calls`` decoded from its JSON text."""
    if not any(isinstance(m.get("tool_calls"), str) for m in messages):
        return messages
    return [
        {**m, "tool_calls": json.loads(m["tool_calls"])}
        if isinstance(m.get("tool_calls"), str)
        else m
        for m in messages
    ]
