"""Step-output references in step inputs, ``{{steps.<id>.output...}}``, found in linear time.

Planning checks that a step refers only to its ancestors and excuses a string holding a
reference from its tool's schema; the coordinator fills the references in before a step
runs. Both read the text of untrusted requests, so both use this one scanner: its cost is
linear in the length of the text whatever the text is (a backtracking regex for the same
language took seconds on 60 KB and stalled the planning server's event loop).

The language is the one the planning service always accepted::

    "{{" WS* "steps." ID ".output" [("." | "[") NOT_BRACE*] WS* "}}"

where ``ID`` is 1 to 64 characters of ``[A-Za-z0-9_.-]``, the shortest one for which the
rest matches (an id may itself contain ``.output``), ``NOT_BRACE`` is any character but
``}``, and ``WS`` is what Python's ``\\s`` and :meth:`str.isspace` call white space. References
are found left to right and do not overlap, as :func:`re.finditer` would find them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

#: Longest step id in a reference (the contract's limit on step ids).
MAX_STEP_ID_CHARS = 64

_OUTPUT = ".output"
# Where a reference may start, and the run of id characters after it (group 1). Linear:
# the only unbounded quantifier's class (white space) holds neither the "{" before it nor
# the "s" after it, so from a given start it can only end where the white space does
# (shorter tries fail at once), each run of white space follows one "{{" only, and nothing
# follows the bounded {1,64}, so its first (longest) try is the match.
_HEAD = re.compile(rf"\{{\{{\s*steps\.([A-Za-z0-9_.\-]{{1,{MAX_STEP_ID_CHARS}}})")
# One quantifier over one class with nothing after it: never backtracks.
_SPACE = re.compile(r"\s+")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Reference(NamedTuple):
    """One ``{{steps.<id>.output...}}`` in a text (a tuple: a long input may hold
    thousands, and a tuple is the cheapest record to make)."""

    start: int
    """Index of the opening ``{{``."""
    end: int
    """Index just past the closing ``}}``."""
    step_id: str
    """The step whose output is referred to."""
    path: str
    """What follows ``output`` up to the closing braces, trailing white space dropped:
    ``""``, ``".total"``, ``".items.0"`` (and, accepted but not resolvable, ``"[0]"``)."""

    def keys(self) -> list[str] | None:
        """The keys of a dotted path (``".a.b"`` -> ``["a", "b"]``, ``""`` -> ``[]``); None
        for any other path (brackets, spaces, empty segments), which the engine cannot
        resolve."""
        if not self.path:
            return []
        if self.path[0] != ".":
            return None
        keys = self.path[1:].split(".")
        return keys if all(k and _KEY_CHARS.issuperset(k) for k in keys) else None

    def is_whole(self, text: str) -> bool:
        """Whether this reference is all of ``text`` (of which it is the first), but for
        white space around it."""
        return self.start == len(text) - len(text.lstrip()) and self.end == len(text.rstrip())


def references(text: str) -> Iterator[Reference]:
    """Every reference in ``text``, left to right, none overlapping."""
    # Where the first "}" at or after close_from is (-1: nowhere). The scanner only asks
    # about positions further on, so one remembered answer makes all of its questions one
    # pass over the text (a fresh search per candidate is what made the old regex
    # quadratic). One loop, no helper calls: a long input may hold thousands of candidates.
    close_from, close_at = len(text) + 1, -1
    head = _HEAD.search(text)
    while head is not None:
        start = head.start()
        id_start, id_end = head.span(1)
        found = None
        # The id is the shortest run of id characters followed by ".output" and a valid
        # end; find() jumps from one ".output" to the next (at most nine in 64 characters).
        limit = id_end + len(_OUTPUT)
        at = text.find(_OUTPUT, id_start + 1, limit)
        while at != -1:
            after = at + len(_OUTPUT)
            nxt = text[after : after + 1]
            if nxt in (".", "["):  # a path: up to the first "}", which must start "}}"
                if not (close_from <= after + 1 and (close_at == -1 or after + 1 <= close_at)):
                    close_from, close_at = after + 1, text.find("}", after + 1)
                if close_at != -1 and text.startswith("}", close_at + 1):
                    path = text[after:close_at].rstrip()
                    found = Reference(start, close_at + 2, text[id_start:at], path)
                    break
            elif nxt == "}" or nxt.isspace():  # no path: white space, then "}}"
                space = _SPACE.match(text, after)
                close = space.end() if space else after
                if text.startswith("}}", close):
                    found = Reference(start, close + 2, text[id_start:at], "")
                    break
            at = text.find(_OUTPUT, at + 1, limit)
        if found is None:
            head = _HEAD.search(text, start + 1)
        else:
            yield found
            head = _HEAD.search(text, found.end)


def has_reference(text: str) -> bool:
    """Whether ``text`` holds at least one reference."""
    return next(references(text), None) is not None


__all__ = ["MAX_STEP_ID_CHARS", "Reference", "has_reference", "references"]
