"""A worker's byte range of a chat jsonl file, read by Arrow's JSON parser when every message in it
is a plain {role, content} pair of strings: parsed, stripped, screened for empties and hashed as
columns (C++), where ``examples._read_task``'s loop builds a Python dict per message and converts
them back to Arrow. The result is exactly that loop's; a range this reader cannot vouch for
(anything but plain messages, a line that is not one JSON object, a system prompt to add) gives
None and goes through the loop, which also says what is wrong with it."""

from __future__ import annotations

import hashlib
import json
import re

# the characters str.strip() removes (those str.isspace() holds; a test checks the list), which
# Arrow's trim is given by name: its own whitespace trim keeps U+001C-U+001F, which Python strips
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# a blank line, found from the line end before it (the text stream skips it; the parser would
# too, and the row count must not be fooled by one): a pattern led by a literal is fast to search
_BLANK = re.compile(rb"\n[ \t\r]*(?:\n|\Z)")
_BOM = b"\xef\xbb\xbf"


def _lines(raw: bytes) -> tuple[bytes, int] | None:
    """The range without its last line end, and its line count; None where the text stream
    would cut or skip lines where the parser does not (a lone CR, a blank line)."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    if not body or _BLANK.search(b"\n" + body):
        return None
    if b"\r" in body and body.count(b"\r") != body.count(b"\r\n") + body.endswith(b"\r"):
        return None  # a CR that is not a CRLF's: the text stream ends a line there
    return body, body.count(b"\n") + 1


# Values cross between Python, numpy and Arrow through buffers: ``to_numpy``, ``pa.array`` and
# ``pa.scalar`` (which compute functions call on a Python string) import pandas, half a second
# in each worker


def _numbers(array, dtype):
    """A null-free Arrow array of fixed-width numbers as numpy, a view of its data buffer."""
    import numpy as np

    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset : array.offset + len(array)]


def _arrow(values, typ):
    """A numpy array of int32 (``typ`` int32) or bool (``typ`` bool) as an Arrow array."""
    import numpy as np
    import pyarrow as pa

    data = np.packbits(values, bitorder="little") if values.dtype == bool else values
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(data)])


def _text(value: str):
    """``value`` as an Arrow string scalar."""
    import numpy as np
    import pyarrow as pa

    data = value.encode("utf-8")
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])[0]


def read_range(raw: bytes, start: int, recipe, schema, tag: str | None):
    """(table in ``schema``, records read, empties dropped, the hashes' bytes (16 an example),
    the first record) of one range of plain chat records, as ``examples._read_task`` makes them;
    None when the range is not one this reader gives exactly that for."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    d = recipe.data
    if recipe.task != "causal_lm" or d.style != "chat" or d.system_prompt:
        return None
    if schema.names != ["messages"] + (["source"] if tag is not None else []):
        return None
    if [f.name for f in schema.field("messages").type.value_type][:2] != ["role", "content"]:
        return None  # the examples' message fields, in the order the table is built in
    if start == 0 and raw.startswith(_BOM):  # the text stream reads the file as utf-8-sig
        raw = raw[len(_BOM) :]
    lines = _lines(raw)
    if lines is None:
        return None
    body, n = lines
    try:
        raw.decode("utf-8")  # the parser lets some bytes that are not utf-8 through
        options = pj.ReadOptions(use_threads=False, block_size=len(raw) + 1)
        table = pj.read_json(pa.BufferReader(raw), read_options=options)
    except (pa.ArrowException, ValueError):  # not utf-8, not JSON objects, two types in a column
        return None
    if table.num_rows != n or d.messages_column not in table.column_names:
        return None  # two objects on a line (json.loads refuses those), or no such column
    msgs = table.column(d.messages_column).combine_chunks()
    typ = msgs.type
    if not (
        pa.types.is_list(typ)
        and pa.types.is_struct(typ.value_type)
        and sorted(f.name for f in typ.value_type) == ["content", "role"]
        and all(f.type == pa.string() for f in typ.value_type)
        and msgs.null_count == 0
    ):
        return None  # other fields, other types, or a missing list: not plain messages
    flat = msgs.flatten()
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    if flat.null_count or role.null_count or content.null_count:
        return None
    if d.clean.strip:
        content = pc.utf8_trim(content, WHITESPACE)
    offsets = _numbers(msgs.offsets, np.int32)
    offsets = offsets - offsets[0]
    keep = np.ones(n, dtype=bool)
    if d.clean.drop_empty:  # examples._is_empty: no assistant text, or an empty message
        owner = np.repeat(np.arange(n), np.diff(offsets))
        empty = _numbers(pc.utf8_length(content), np.int32) == 0
        answer = _numbers(pc.cast(pc.equal(role, _text("assistant")), pa.int8()), np.int8) == 1
        answer &= ~empty
        keep = (np.bincount(owner[answer], minlength=n) > 0) & ~(
            np.bincount(owner[empty], minlength=n) > 0
        )
    inner = schema.field("messages").type.value_type
    fields = [role, content] + [pa.nulls(len(flat), f.type) for f in list(inner)[2:]]
    struct = pa.StructArray.from_arrays(fields, fields=list(inner))
    offsets = _arrow(offsets.astype(np.int32), pa.int32())
    messages = pa.ListArray.from_arrays(offsets, struct, type=schema.field(0).type)
    mask = _arrow(keep, pa.bool_())
    messages = messages.filter(mask)
    # examples._key_bytes of a plain chat example: "\0" "8:messages" "m<turns>:" then
    # "<len>:<role><len>:<content>" per message, lengths in characters
    length = lambda s: pc.cast(pc.utf8_length(s), pa.string())  # noqa: E731
    colon, nothing = _text(":"), _text("")
    turn = pc.binary_join_element_wise(
        length(role), colon, role, length(content), colon, content, nothing
    )
    turns = pa.ListArray.from_arrays(offsets, turn).filter(mask)
    count = pc.cast(pc.list_value_length(turns), pa.string())
    head = _text("\x008:messagesm")
    key = pc.binary_join_element_wise(head, count, colon, pc.binary_join(turns, nothing), nothing)
    digests = b"".join(
        hashlib.blake2b(k, digest_size=16).digest() for k in pc.cast(key, pa.binary()).to_pylist()
    )
    cols = [messages]
    if tag is not None:
        cols.append(pa.repeat(_text(tag), len(messages)))
    out = pa.Table.from_arrays(cols, schema=schema)
    first = json.loads(body.split(b"\n", 1)[0])
    return out, n, int(n - keep.sum()), digests, first
