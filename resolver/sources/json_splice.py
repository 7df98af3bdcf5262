"""A changed JSON graph file turned into a delta from its bytes, without decoding all of it.

The file decoder helper keeps the last file's bytes and a Layout: where each top-level value,
and each entry of the `envs` and `shared` mappings, sits in them. For the next file it finds
the one changed byte range (common prefix and suffix: memcmp speed), the entries around it,
and decodes only those with orjson: about a millisecond for a one-env change of a 10,000-env
file, against ~25 ms to decode the whole file and ~15 ms to fingerprint it.

Why the answer is the full decode's: bytes outside the range are the old file's, so the parser
reaches the range's section in the state it had in the old file (just after `{`, `,` or `:`),
and leaves it in the state it had there too, provided the new section parses on its own as
members (or as one value). JSON's tokens never run across such a boundary. Anything else,
changes in two places, a duplicate name, a non-ASCII file, gets None: the caller decodes the
whole file as before.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Any, NamedTuple

import orjson

from .delta import ENTRY_KEYS, entry_part


class Entries:
    """An ENTRY_KEYS mapping's members in file order, as parallel lists: shifting 10,000
    offsets is then three list comprehensions (~1 ms), not 10,000 objects."""
    __slots__ = ("names", "key_starts", "starts", "ends")

    def __init__(self, names: list[str], key_starts: list[int], starts: list[int],
                 ends: list[int]) -> None:
        self.names, self.key_starts, self.starts, self.ends = names, key_starts, starts, ends

    def __repr__(self) -> str:
        return f"<Entries {len(self.names)}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entries) and all(
            getattr(self, a) == getattr(other, a) for a in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def spliced(self, first: int, last: int, section: Entries, by: int) -> Entries:
        """Entries first..last replaced by `section` (new offsets); those after move by `by`."""
        after = slice(last + 1, None)
        return Entries(
            self.names[:first] + section.names + self.names[after],
            self.key_starts[:first] + section.key_starts + [x + by for x in self.key_starts[after]],
            self.starts[:first] + section.starts + [x + by for x in self.starts[after]],
            self.ends[:first] + section.ends + [x + by for x in self.ends[after]])


class Member(NamedTuple):
    """A top-level `"name": value` of a graph file: byte offsets of the key's quote and the
    value; `entries` for an ENTRY_KEYS mapping."""
    name: str
    key_start: int
    start: int
    end: int
    entries: Entries | None

    def moved(self, by: int) -> Member:
        entries = self.entries
        if entries is not None:
            entries = entries.spliced(0, -1, Entries([], [], [], []), by)
        return Member(self.name, self.key_start + by, self.start + by, self.end + by, entries)


Layout = tuple[Member, ...]  # the top-level members of a graph file, in file order

_WS = re.compile(r"[ \t\n\r]*")
_CHUNK = 4096


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: orjson refuses them too


_scan = json.JSONDecoder(parse_constant=_reject_constant).scan_once
_scanstring = json.decoder.scanstring


def layout(data: bytes) -> Layout | None:
    """Where every top-level value and ENTRY_KEYS entry of the JSON object in `data` sits, or
    None (not an ASCII JSON object, or a name given twice). The stdlib's C scanner, ~60 ms
    at 10,000 envs: done once per base, then kept up to date by splice()."""
    if not data.isascii():  # byte offsets are character offsets only in ASCII
        return None
    text = data.decode("ascii")
    try:
        i = _WS.match(text).end()  # type: ignore[union-attr]
        if text[i] != "{":
            return None
        top, mappings, end = _members(text, i, expand=True)
        if _WS.match(text, end).end() != len(text):  # type: ignore[union-attr]
            return None
    except (ValueError, StopIteration, IndexError, _Duplicate):
        return None
    return tuple(Member(name, k, s, e, mappings.get(name)) for name, k, s, e in
                 zip(top.names, top.key_starts, top.starts, top.ends, strict=True))


class _Duplicate(Exception):
    pass


def _members(text: str, i: int, *, expand: bool) -> tuple[Entries, dict[str, Entries], int]:
    """The members of the object whose `{` is at text[i], the members of those that are
    ENTRY_KEYS mappings (when `expand`: the top level) and the offset after its `}`."""
    out = Entries([], [], [], [])
    mappings: dict[str, Entries] = {}
    seen: set[str] = set()
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i] == "}":
        return out, mappings, i + 1
    while True:
        if text[i] != '"':
            raise ValueError("expected a name")
        name, j = _scanstring(text, i + 1)
        if name in seen:
            raise _Duplicate(name)
        seen.add(name)
        j = _WS.match(text, j).end()  # type: ignore[union-attr]
        if text[j] != ":":
            raise ValueError("expected ':'")
        start = _WS.match(text, j + 1).end()  # type: ignore[union-attr]
        if expand and name in ENTRY_KEYS and text[start] == "{":
            mappings[name], _, end = _members(text, start, expand=False)
        else:
            end = _scan(text, start)[1]
        out.names.append(name)
        out.key_starts.append(i)
        out.starts.append(start)
        out.ends.append(end)
        i = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        elif text[i] == "}":
            return out, mappings, i + 1
        else:
            raise ValueError("expected ',' or '}'")


def changed_range(old: bytes, new: bytes) -> tuple[int, int]:
    """(p, q): old[:p] == new[:p] and old[q:] == new[q + len(new) - len(old):], the shortest
    such range (p <= q; on both sides the prefix and suffix do not overlap)."""
    n = min(len(old), len(new))
    p = 0
    while p < n and old[p:p + _CHUNK] == new[p:p + _CHUNK]:
        p += _CHUNK
    p = min(p, n)
    while p < n and old[p] == new[p]:  # within the first chunk that differs
        p += 1
    limit = n - p  # the suffix may not reach into the prefix on either side
    s, lo, ln = 0, len(old), len(new)
    while s + _CHUNK <= limit and old[lo - s - _CHUNK:lo - s] == new[ln - s - _CHUNK:ln - s]:
        s += _CHUNK
    while s < limit and old[lo - s - 1] == new[ln - s - 1]:
        s += 1
    return p, lo - s


def splice(old: bytes, old_layout: Layout, new: bytes) -> tuple[dict, Layout] | None:
    """(the delta that turns old's document into new's, new's layout), or None when the change
    is not one this can prove (see the module's docstring): decode the whole file then."""
    if old == new:
        return {}, old_layout
    if not new.isascii():
        return None
    p, q = changed_range(old, new)
    by = len(new) - len(old)
    index = next((k for k, m in enumerate(old_layout) if m.start <= p and q <= m.end), None)
    if index is None:
        return None  # across top-level members, or in the braces around them
    top = old_layout[index]
    try:
        if top.entries is None:
            if top.name in ENTRY_KEYS:  # was not a mapping: its new value needs its members
                return None
            raw = new[top.start:top.end + by]
            value = orjson.loads(raw)
            # the edit may have added or removed spaces around the value: the layout places
            # the value itself, as a fresh walk does
            lead, trail = len(raw) - len(raw.lstrip()), len(raw) - len(raw.rstrip())
            changed = Member(top.name, top.key_start, top.start + lead, top.end + by - trail, None)
            same = _same(old[top.start:top.end], value)
            delta: dict = {} if same else {"set": {top.name: value}}
        elif top.start < p and q < top.end:  # inside the mapping's braces
            found = _splice_entries(old, top, new, p, q, by)
            if found is None:
                return None
            part, changed = found
            delta = {top.name: part} if part else {}
        else:
            return None
    except (orjson.JSONDecodeError, ValueError, StopIteration, IndexError, _Duplicate):
        return None
    moved = tuple(m.moved(by) for m in old_layout[index + 1:])
    return delta, old_layout[:index] + (changed,) + moved


def _splice_entries(old: bytes, top: Member, new: bytes, p: int, q: int,
                    by: int) -> tuple[dict, Member] | None:
    """The entry delta and the mapping's new Member, for a change within its braces."""
    members = top.entries
    assert members is not None
    # The section: from the key of the last entry starting at or before p (else just after
    # `{`) to the end of the first entry ending at or after q (else just before `}`).
    first = bisect.bisect_right(members.key_starts, p) - 1
    last = bisect.bisect_left(members.ends, q)
    count = len(members.names)
    lo = members.key_starts[first] if first >= 0 else top.start + 1
    hi = members.ends[last] if last < count else top.end - 1
    first = max(first, 0)
    inner = new[lo:hi + by]
    section = _members("{" + inner.decode("ascii") + "}", 0, expand=False)[0]
    if not section.names and (first > 0 or last < count - 1):
        return None  # nothing left between two separators (`, ,` or `, }`): not JSON
    values = orjson.loads(b"{" + inner + b"}")  # orjson's verdict on what it decodes
    shift = lo - 1  # section offsets are into "{" + inner + "}"
    placed = Entries(section.names, [x + shift for x in section.key_starts],
                     [x + shift for x in section.starts], [x + shift for x in section.ends])
    names = members.names
    outside = set(names[:first]) | set(names[last + 1:])
    if not outside.isdisjoint(placed.names):
        return None  # a name given twice in the mapping: the full decode decides which wins
    was = {names[k]: old[members.starts[k]:members.ends[k]]
           for k in range(first, min(last + 1, count))}
    changed = {name: values[name] for name, s, e in zip(placed.names, placed.starts, placed.ends,
                                                         strict=True)
               if name not in was or (was[name] != new[s:e] and not _same(was[name], values[name]))}
    part = entry_part(changed, [name for name in was if name not in values])
    entries = members.spliced(first, last, placed, by)
    return part, Member(top.name, top.key_start, top.start, top.end + by, entries)


def _same(old_value: bytes, value: Any) -> bool:
    """The same JSON value, spelled differently (spaces, escapes): what delta's fingerprints
    call equal, so both ways of diffing give one delta."""
    return orjson.dumps(orjson.loads(old_value)) == orjson.dumps(value)
