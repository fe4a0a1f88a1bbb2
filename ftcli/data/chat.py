"""Chat rendering and the assistant spans the loss is taken on, found with one template render
per conversation and checked.

The spans are where the assistant turns sit in the rendered conversation: a turn starts where
the rendering of the conversation before it (with the generation prompt) ends, and ends where
the rendering up to and including it ends. Rendering those prefixes for every conversation costs
2-6 renders each; instead, per sequence of roles, a *skeleton* conversation whose contents are
unique placeholders is rendered once with its prefixes (``Skeleton``). Each real conversation is
then rendered once and compared with the skeleton's rendering with the placeholders replaced by
the real contents: equal, and the spans follow from the skeleton; not equal (a template whose
output depends on the contents), and that conversation's prefixes are rendered for real. Either
way the spans are the ones the prefix renders give.

The check (``Segments.problem``): every prefix rendering must be a prefix of the whole, and each
assistant span must hold exactly that turn's content (after whitespace) and then only the
template's end-of-turn text. A template that fails it (one that drops earlier turns' reasoning,
say) would train on the wrong tokens without a word.

Reasoning and tools: an assistant message may carry ``reasoning_content`` and ``tool_calls``,
and ``tool`` turns hold what a call returned. Where each part of an assistant turn sits is found
by rendering the turn again without it: the characters that change are that part's. The check
then also asks that the template write every part it was given (a template that leaves out the
reasoning would train on answers the user believes come with it), and ``data.train_on`` picks
which parts are targets (``part_targets``).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from ftcli.data.messages import for_template
from ftcli.errors import FtcliError
from ftcli.recipe.schema import CHAT_TEMPLATES, TRAIN_ON

FALLBACK_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}

# A placeholder content: private-use characters around the message's index, padded with two
# whitespace characters no template writes itself, so the skeleton shows whether a template
# strips a content's leading or trailing whitespace (``| trim``).
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_PAD = "\u2003\u2002"
_MARK = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def render_chat(
    tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None
) -> str:
    """The tokenizer's chat template, or a plain '### Role:' layout for base models without one.
    ``tools``: function definitions for a template that renders them (``renders_tools``)."""
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(
            for_template(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    text = "".join(
        f"### {FALLBACK_ROLE.get(m['role'], m['role'].title())}:\n{m['content']}\n\n"
        for m in messages
    )
    return text + ("### Assistant:\n" if add_generation_prompt else "")


# --------------------------------------------------------------------------- choosing a template


def templates_dir() -> Path:
    """The Jinja templates ftcli ships (ftcli/bundled/templates/)."""
    from ftcli.bundled import _root

    return _root() / "templates"


def template_text(choice: str | None) -> str | None:
    """The Jinja text ``data.chat_template`` names: None for the model's own (None or "model"),
    a shipped one by name, else the file at that path."""
    if choice in (None, "model"):
        return None
    if choice in CHAT_TEMPLATES:
        return (templates_dir() / f"{choice}.jinja").read_text(encoding="utf-8")
    path = Path(choice).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FtcliError(
            f"data.chat_template: cannot read the template {choice!r} "
            f"({type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else exc})",
            hint=f"name one ftcli ships ({', '.join(CHAT_TEMPLATES)}), model for the model's own, "
            "or the path of a Jinja file",
        ) from None
    if not text.strip():
        raise FtcliError(f"data.chat_template: the template file {choice} is empty")
    return text


def use_template(tokenizer, recipe):
    """``tokenizer`` with the recipe's ``data.chat_template`` set on it (unchanged for the model's
    own), so everything that renders, and everything saved with it, uses that template."""
    text = template_text(getattr(recipe.data, "chat_template", None))
    if text is not None:
        tokenizer.chat_template = text
    return tokenizer


def recipe_tokenizer(recipe):
    """(tokenizer, source, local folder) of a recipe: its model's tokenizer with the recipe's chat
    template (``models.load_tokenizer`` and ``use_template``)."""
    from ftcli.models import load_tokenizer

    tokenizer, source, folder = load_tokenizer(recipe.model)
    return use_template(tokenizer, recipe), source, folder


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "ftcli_probe_tool",
        "description": "does nothing",
        "parameters": {"type": "object", "properties": {}},
    },
}
_RENDERS_TOOLS: dict[str, bool] = {}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes the tools it is given into the prompt (a
    template that ignores them would have the model answer without knowing of them)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if template not in _RENDERS_TOOLS:
        msgs = [{"role": "user", "content": "hi"}]
        try:
            text = render_chat(tokenizer, msgs, True, tools=[_PROBE_TOOL])
        except Exception:  # a template that refuses tools does not render them
            text = ""
        _RENDERS_TOOLS[template] = "ftcli_probe_tool" in text
    return _RENDERS_TOOLS[template]


@dataclass(frozen=True)
class Segments:
    """A rendered conversation, its assistant spans (character offsets), and the check's verdict:
    None, or what is wrong with the first turn that fails it. ``targets``: the character spans
    the loss is taken on (None: the assistant spans; ``data.train_on`` may leave parts out)."""

    text: str
    spans: list[tuple[int, int]]
    problem: str | None = None
    targets: list[tuple[int, int]] | None = None

    @property
    def target_spans(self) -> list[tuple[int, int]]:
        return self.spans if self.targets is None else self.targets


# --------------------------------------------------------------------------- exact (per example)


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _excerpt(text: str, at: int, width: int = 30) -> str:
    return repr(text[at : at + width]) if at < len(text) else "(its end)"


def _not_prefix(what: str, part: str, full: str) -> str:
    k = _first_difference(part, full)
    return (
        f"{what} is not a prefix of the whole conversation's: from character {k} it reads "
        f"{_excerpt(part, k)} where the whole reads {_excerpt(full, k)}"
    )


def _span_problem(turn: int, messages: list[dict], full: str, s: int, e: int) -> str | None:
    """None when ``full[s:e]`` is whitespace, then the turn's content (or it stripped: ``| trim``),
    then the rest of what the template writes for the turn (its end-of-turn marker: the prefix
    checks hold the span's end to the turn's own rendering). A conversation that opens with the
    assistant has its span start at 0, whatever the template writes before the content."""
    content = messages[turn]["content"]
    body = full[s:e]
    rest = body.lstrip()
    if turn == 0:
        found = [body.find(c) for c in (content, content.strip()) if c in body]
        if found:
            return None
    elif rest.startswith(content) or rest.startswith(content.strip()):
        return None
    k = _first_difference(rest, content)
    return (
        f"the span of assistant message {turn + 1} (characters {s}-{e}) does not hold exactly that "
        f"turn's content and its end-of-turn marker: after {len(body) - len(rest) + k} matching "
        f"characters it reads {_excerpt(rest, k)} where the content reads {_excerpt(content, k)}"
    )


def exact_segments(tokenizer, messages: list[dict], train_on=TRAIN_ON) -> Segments:
    """The spans from rendering each prefix for real (the way they were always found), checked;
    an assistant turn with reasoning or tool calls has its parts found too (``part_targets``)."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans, targets, problem = [], [], None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = 0
        if i:
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            start = len(before)
            if problem is None and not full.startswith(before):
                problem = _not_prefix(
                    f"the rendering before assistant message {i + 1} (with the generation prompt)",
                    before,
                    full,
                )
        if i == len(messages) - 1:  # the same call as ``full``: no need to render it again
            upto = full
        else:
            upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if problem is None and not full.startswith(upto):
                problem = _not_prefix(f"the rendering up to assistant message {i + 1}", upto, full)
        end = len(upto)
        spans.append((start, end))
        if "reasoning_content" in m or "tool_calls" in m:
            found, why = part_targets(tokenizer, messages, i, upto, start, train_on)
            targets.extend(found)
            problem = problem or why
        else:  # its content is all there is to it: an answer
            if "answers" in train_on:
                targets.append((start, end))
            if problem is None:
                problem = _span_problem(i, messages, full, start, end)
    return Segments(full, spans, problem, None if targets == spans else targets)


# each part data.train_on names, and the message field it is made of
FIELD_OF = {"answers": "content", "reasoning": "reasoning_content", "tool_calls": "tool_calls"}
PART_OF = {field: part for part, field in FIELD_OF.items() if part != "answers"}


def _changed(a: str, b: str, floor: int) -> tuple[int, int]:
    """The characters of ``a`` that ``b`` lacks: (start, end) in ``a`` between their common
    prefix and common suffix (the suffix never reaching into the prefix). Where the text around
    them repeats, such a region can slide; it is taken as far left as it goes, not before
    ``floor`` (``<think>...</think>\n\n`` before ``<tool_call>``, not ``hink>...\n\n<t``)."""
    p = _first_difference(a, b)
    q = 0
    limit = min(len(a), len(b)) - p
    while q < limit and a[len(a) - 1 - q] == b[len(b) - 1 - q]:
        q += 1
    s, e = p, len(a) - q
    while s > floor and s < e and a[s - 1] == a[e - 1]:
        s, e = s - 1, e - 1
    return s, e


def part_targets(
    tokenizer, messages: list[dict], i: int, upto: str, start: int, train_on=TRAIN_ON
) -> tuple[list[tuple[int, int]], str | None]:
    """(target spans, problem) of assistant turn ``i``, which carries reasoning or tool calls;
    ``upto``: the rendering up to and including it, ``start``: where its span starts.

    Each part's characters are those that change when the turn is rendered without it. The
    check: the template writes each part (inside the turn's span, with its text in it), and the
    rest of the span, after whitespace, starts with the turn's content. Targets: each part that
    ``train_on`` names, the content when it names ``answers``, and the rest of the span (the
    template's markers, the end of the turn) when any part of the turn present is a target."""
    m = messages[i]
    end = len(upto)
    regions: dict[str, tuple[int, int]] = {}
    for key in ("reasoning_content", "tool_calls"):
        if key not in m:
            continue
        without = [*messages[:i], {k: v for k, v in m.items() if k != key}]
        a, b = _changed(upto, render_chat(tokenizer, without, add_generation_prompt=False), start)
        what = f"assistant message {i + 1}'s {key}"
        if a >= b:
            return [(start, end)], (
                f"the chat template does not write {what}: training would not see it (pick a "
                "template that does, such as qwen, or leave the field out of the data)"
            )
        if a < start:
            return [(start, end)], f"the chat template writes {what} before the turn's own span"
        text = upto[a:b]
        if key == "reasoning_content":
            missing = m[key].strip() not in text
        else:
            names = [c["function"]["name"] for c in json.loads(m[key])]
            missing = not all(n in text for n in names)
        if missing:
            return [(start, end)], (
                f"rendering assistant message {i + 1} without its {key} changes characters "
                f"{a}-{b} ({_excerpt(upto, a)}), which do not hold it: its place cannot be told"
            )
        regions[PART_OF[key]] = (a, b)
    # the rest of the span: the content (where the parts are not) and the template's markers
    taken = sorted(regions.values())
    rest, kept = [], []  # characters outside the parts, and their offsets
    at = start
    for a, b in [*taken, (end, end)]:
        rest.append(upto[at:a])
        kept.extend(range(at, a))
        at = max(at, b)
    body = "".join(rest)
    content = m["content"]
    c0 = c1 = None
    if content.strip():
        lead = len(body) - len(body.lstrip())
        for c in (content, content.strip()):
            # a conversation that opens with the assistant: its span starts at 0, header and all
            at = body.find(c) if i == 0 else (lead if body.startswith(c, lead) else -1)
            if at >= 0:
                c0, c1 = kept[at], kept[at + len(c) - 1] + 1
                break
        else:
            k = _first_difference(body.lstrip(), content)
            return [(start, end)], (
                f"the span of assistant message {i + 1} (characters {start}-{end}), its "
                f"reasoning and tool calls set aside, does not start with that turn's content: "
                f"after {lead + k} matching characters it reads {_excerpt(body.lstrip(), k)} where "
                f"the content reads {_excerpt(content, k)}"
            )
    present = set(regions) | ({"answers"} if c0 is not None else set())
    if present <= set(train_on):
        return [(start, end)], None
    out: list[tuple[int, int]] = []
    if present & set(train_on):  # the markers and the end of the turn
        cut = sorted([*taken, *([(c0, c1)] if c0 is not None else [])])
        at = start
        for a, b in [*cut, (end, end)]:
            if a > at:
                out.append((at, a))
            at = max(at, b)
    if c0 is not None and "answers" in train_on:
        out.append((c0, c1))
    out.extend(regions[p] for p in regions if p in train_on)
    return sorted(out), None


# --------------------------------------------------------------------------- skeletons


@dataclass(frozen=True)
class _Length:
    """The length of a rendering as the skeleton showed it: literal characters plus the
    contents that appear in it (each (message, strips left, strips right))."""

    const: int
    refs: tuple[tuple[int, bool, bool], ...]

    def of(self, contents: list[str]) -> int:
        return self.const + sum(len(_shaped(contents[j], lft, rgt)) for j, lft, rgt in self.refs)


def _shaped(content: str, left: bool, right: bool) -> str:
    if left and right:
        return content.strip()
    if left:
        return content.lstrip()
    return content.rstrip() if right else content


def _parse(text: str) -> tuple[list, _Length] | None:
    """A skeleton rendering -> (its pieces: literal strings and (message, strips left, strips
    right)), its length); None when a placeholder came out partly stripped (not ``| trim``)."""
    pieces: list = []
    const, refs, at = 0, [], 0
    for m in _MARK.finditer(text):
        s, e = m.start(), m.end()
        left = not text.startswith(_PAD, s - len(_PAD)) if s >= len(_PAD) else True
        right = not text.startswith(_PAD, e)
        if not left:
            s -= len(_PAD)
        elif s and text[s - 1] in _PAD:
            return None
        if not right:
            e += len(_PAD)
        elif e < len(text) and text[e] in _PAD:
            return None
        if s < at:  # two placeholders sharing a pad: nothing a real template renders
            return None
        pieces.append(text[at:s])
        const += s - at
        ref = (int(m.group(1)), left, right)
        pieces.append(ref)
        refs.append(ref)
        at = e
    pieces.append(text[at:])
    const += len(text) - at
    return pieces, _Length(const, tuple(refs))


@dataclass(frozen=True)
class Skeleton:
    """One sequence of roles rendered with placeholder contents: the whole conversation's pieces
    and each assistant turn's (start, end) as lengths of the prefix renderings; ``sound``: the
    skeleton passes the check (each prefix a prefix of the whole, each span its turn's content
    and then literal text)."""

    pieces: list
    spans: list[tuple[_Length, _Length]]
    sound: bool

    def text(self, contents: list[str]) -> str:
        return "".join(
            p if isinstance(p, str) else _shaped(contents[p[0]], p[1], p[2]) for p in self.pieces
        )


def _skeleton_of(tokenizer, roles: tuple[str, ...]) -> Skeleton | None:
    """The skeleton of a role sequence, or None when its renderings cannot stand in for the real
    ones (the template failed on it, or placeholders came out partly stripped)."""
    msgs = [{"role": r, "content": f"{_PAD}{_OPEN}{j}{_CLOSE}{_PAD}"} for j, r in enumerate(roles)]
    try:
        full = render_chat(tokenizer, msgs, add_generation_prompt=False)
        whole = _parse(full)
        if whole is None:
            return None
        pieces, _ = whole
        spans, sound = [], True
        for i, r in enumerate(roles):
            if r != "assistant":
                continue
            start = _Length(0, ())
            if i:
                before = render_chat(tokenizer, msgs[:i], add_generation_prompt=True)
                parsed = _parse(before)
                if parsed is None:
                    return None
                start = parsed[1]
                sound = sound and full.startswith(before)
            if i == len(roles) - 1:
                end = whole[1]
            else:
                upto = render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False)
                parsed = _parse(upto)
                if parsed is None:
                    return None
                end = parsed[1]
                sound = sound and full.startswith(upto)
            spans.append((start, end))
            sound = sound and _skeleton_span_sound(full, i, start, end, len(roles))
    except Exception:  # the template refuses this role sequence: the real renders will say why
        return None
    return Skeleton(pieces, spans, sound)


def _skeleton_span_sound(full: str, turn: int, start: _Length, end: _Length, n: int) -> bool:
    """The skeleton span of ``turn`` holds whitespace, that turn's placeholder, then no other."""
    # the skeleton's own lengths: every placeholder as written (pads included where kept)
    contents = [f"{_PAD}{_OPEN}{j}{_CLOSE}{_PAD}" for j in range(n)]
    body = full[start.of(contents) : end.of(contents)]
    found = list(_MARK.finditer(body))
    if len(found) != 1 or int(found[0].group(1)) != turn:
        return False
    return turn == 0 or not body[: found[0].start()].strip(_PAD).strip()


_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NO_WEAKREF: dict = {}


def _skeletons(tokenizer) -> dict:
    """The skeleton cache of a tokenizer (per template: a template set later starts afresh)."""
    try:
        per = _SKELETONS.setdefault(tokenizer, {})
    except TypeError:
        per = _NO_WEAKREF.setdefault(id(tokenizer), {})
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str | None) else repr(template)
    return per.setdefault(key, {})


def segments(tokenizer, messages: list[dict], train_on=TRAIN_ON) -> Segments:
    """The rendered conversation, its assistant spans and the check's verdict: one render when
    the conversation's role sequence has a sound skeleton that it matches, else the prefixes
    rendered for real (always for reasoning and tool calls: ``train_on`` picks their targets)."""
    if not all(m.keys() == {"role", "content"} and isinstance(m["content"], str) for m in messages):
        return exact_segments(tokenizer, messages, train_on)
    roles = tuple(m["role"] for m in messages)
    cache = _skeletons(tokenizer)
    if roles not in cache:
        cache[roles] = _skeleton_of(tokenizer, roles)
    sk = cache[roles]
    if sk is None or not sk.sound:
        return exact_segments(tokenizer, messages, train_on)
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    contents = [m["content"] for m in messages]
    if full != sk.text(contents):  # this template's output depends on the contents
        return exact_segments(tokenizer, messages, train_on)
    spans = [(s.of(contents), e.of(contents)) for s, e in sk.spans]
    return Segments(full, spans, None, None if "answers" in train_on else [])


# --------------------------------------------------------------------------- checking a data set

CHECK_ALL_UP_TO = 20_000  # conversations `validate` checks one by one; beyond: a sample this size


@dataclass(frozen=True)
class ChatCheck:
    """What ``check_conversations`` found: how many conversations it checked of how many, and
    the failures as (split, index in the split, messages, problem), the first few of ``failed``."""

    checked: int
    total: int
    failed: int
    failures: list[tuple[str, int, list[dict], str]]


def check_conversations(
    tokenizer,
    splits: dict,
    limit: int | None = CHECK_ALL_UP_TO,
    keep: int = 5,
    seed: int = 0,
    also=None,
) -> ChatCheck:
    """Run the chat check over the conversations of ``splits`` ({name: examples}): all of them,
    or an even random sample of ``limit`` when there are more. ``also(messages)``: a further
    check of a conversation that passes (a problem, or None)."""
    import random

    sizes = {s: len(rows) for s, rows in splits.items()}
    total = sum(sizes.values())
    picks: dict[str, list[int]] = {}
    if limit is None or total <= limit:
        picks = {s: list(range(n)) for s, n in sizes.items()}
    else:
        rng = random.Random(seed)
        chosen = sorted(rng.sample(range(total), limit))
        at = 0
        for s, n in sizes.items():
            picks[s] = [i - at for i in chosen if at <= i < at + n]
            at += n
    checked = failed = 0
    failures = []
    for s, rows in splits.items():
        for i in picks[s]:
            example = rows[i]
            if "messages" not in example:
                continue
            checked += 1
            problem = segments(tokenizer, example["messages"]).problem
            if problem is None and also is not None:
                problem = also(example["messages"])
            if problem is not None:
                failed += 1
                if len(failures) < keep:
                    failures.append((s, i, example["messages"], problem))
    return ChatCheck(checked, total, failed, failures)


def train_on_problem(train_on, rows) -> str | None:
    """None when ``data.train_on`` changes what trains on ``rows`` (the training split: a list
    or an Arrow-backed ``Rows``): some assistant turn carries a part it leaves out; else why not
    (the key would do nothing)."""
    left = [p for p in TRAIN_ON if p not in (train_on or TRAIN_ON)]
    if not left:
        return None
    table = getattr(rows, "table", None)
    if table is not None and "messages" in table.column_names:
        import pyarrow.compute as pc

        msgs = pc.list_flatten(table.column("messages"))
        names = {f.name for f in msgs.type}
        assistant = pc.equal(pc.struct_field(msgs, "role"), "assistant")
        for part in left:
            if FIELD_OF[part] not in names:
                continue
            values = pc.struct_field(msgs, FIELD_OF[part])
            has = pc.and_(assistant, pc.greater(pc.utf8_length(values), 0))
            if pc.any(pc.fill_null(has, False)).as_py():
                return None
    else:
        for r in rows:
            for m in r.get("messages", ()):
                if m["role"] == "assistant" and any(m.get(FIELD_OF[p]) for p in left):
                    return None
    fields = " or ".join(FIELD_OF[p] for p in left)
    return (
        f"data.train_on leaves out {' and '.join(left)}, but no assistant turn of the training "
        f"split has {fields}: the key would change nothing"
    )


def first_user(messages: list[dict]) -> str:
    """A conversation's first user message, cut short: what names it in a message."""
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"])
    return repr(str(first)[:40])


# --------------------------------------------------------------------------- {% generation %} masks

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the assistant's text with ``{% generation %}``
    (transformers can then say which tokens are the assistant's)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION.search(template))


def generation_problem(tokenizer, messages: list[dict], ids, mask) -> str | None:
    """None when transformers' assistant mask (the template's ``{% generation %}`` blocks) marks
    exactly the tokens ``mask`` (from the character spans) does, over the same ``ids``; else
    where they first differ."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    theirs = [bool(x) for x in out["assistant_masks"]]
    if list(out["input_ids"]) != [int(t) for t in ids]:
        return "the template's own tokenization differs from the rendered text's"
    ours = [bool(x) for x in mask]
    if messages and messages[0]["role"] == "assistant":  # its span starts at 0, header and all:
        lead = next((i for i, x in enumerate(theirs) if x), len(theirs))  # compared from its text
        ours[:lead] = theirs[:lead]
    if theirs == ours:
        return None
    k = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
    piece = tokenizer.decode([int(t) for t in ids[k : k + 8]])
    return (
        f"the template's {{% generation %}} blocks and the assistant spans disagree from token {k} "
        f"({piece!r}): the blocks {'include' if theirs[k] else 'leave out'} what the spans "
        f"{'include' if ours[k] else 'leave out'}"
    )
