"""Request paths: dot-segment removal and route matching, as pure functions over raw (still encoded) paths.

A path is normalised before any route is chosen, so ``/b/../stageA/admin`` can never be matched by route
``/b`` and then climb out of its upstream's base path: RFC 3986 5.2.4 removes the dot segments, and a path
whose dot segments would change the route its own first segments name, or climb above ``/``, is refused.
Encoded dot segments (``%2e``, ``.%2E``) are refused outright: some upstreams decode them and some do not,
so no single reading of them is safe. No ``..`` segment is ever forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.errors import Refusal


def bad_path(detail: str) -> Refusal:
    """A path the sidecar will not forward: 400 ``bad_request``, ``detail`` says why."""
    return Refusal(400, "bad_request", detail)


# Forms that some server behind API Gateway may read as a dot segment or a separator although RFC 3986 does not:
# Tomcat's path parameters (``..;``), Windows separators (``..\``, ``%5c``), an encoded slash after ``..``, double
# encoding (``%252e``), overlong UTF-8 for ``.`` and ``/`` (``%c0%ae``, ``%e0%80%ae``, ``%c0%af``), and NUL.
_AMBIGUOUS = re.compile(
    rb"(?:^|/|\\|%5c)(?:\.|%2e){2}(?:;|\\|%2f|%5c)"
    rb"|(?:\\|%5c)(?:\.|%2e){2}(?:$|/)"
    rb"|%25(?:2e|2f|5c)|%c0%ae|%c0%2e|%e0%80%ae|%c0%af|%c1%9c|%00",
    re.IGNORECASE,
)


def _is_ambiguous(raw_path: bytes) -> bool:
    """Whether ``raw_path`` holds one of the ``_AMBIGUOUS`` forms."""
    return _AMBIGUOUS.search(raw_path) is not None


def is_plain(raw_path: bytes) -> bool:
    """Whether ``raw_path`` has nothing to resolve or refuse: no ``%``, ``..``, backslash or ``/.`` (nearly every
    request). ``bytes.find``, not ``in``: ``in`` tries the operand as an integer first and clears the TypeError."""
    return (
        raw_path.find(b"%") < 0 and raw_path.find(b"..") < 0 and raw_path.find(b"\\") < 0 and raw_path.find(b"/.") < 0
    )


def path_pattern(glob: str) -> re.Pattern[str]:
    """A route's ``paths`` entry as a pattern: ``*`` matches within one segment, ``**`` across segments, ``?`` one
    character of a segment; everything else is itself."""
    parts = []
    index = 0
    while index < len(glob):
        if glob.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        char = glob[index]
        parts.append("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char))
        index += 1
    return re.compile("".join(parts))


def _has_dot_segment(raw_path: bytes) -> bool:
    """Can ``raw_path`` hold a dot segment, plain or encoded?"""
    return raw_path.find(b"/.") >= 0 or raw_path.find(b"%2") >= 0


def _is_encoded_dot(segment: bytes) -> bool:
    lowered = segment.lower()
    return b"%2e" in lowered and lowered.replace(b"%2e", b".") in (b".", b"..")


def remove_dot_segments(raw_path: bytes) -> bytes:
    """``raw_path`` with ``.`` and ``..`` segments resolved (RFC 3986 5.2.4). Raises a ``Refusal`` for an encoded
    dot segment, a ``..`` that would climb above the root, or a form another server may read as either
    (``_AMBIGUOUS``)."""
    if is_plain(raw_path):
        return raw_path
    if _is_ambiguous(raw_path):
        raise bad_path(
            "the path holds a form some servers read as a dot segment or a separator (..; ..\\ ..%2f, double or "
            "overlong encoding, %00); send a plain path"
        )
    if not _has_dot_segment(raw_path):
        return raw_path
    segments = raw_path.split(b"/")[1:]
    out: list[bytes] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if _is_encoded_dot(segment):
            raise bad_path("the path has an encoded dot segment (%2e); send the path without it")
        if segment == b".":
            if last:
                out.append(b"")
        elif segment == b"..":
            if not out:
                raise bad_path("the path climbs above / with ..; send the path the upstream should see")
            out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def prefix_matches(prefix: bytes, raw_path: bytes) -> bool:
    """Whether route ``prefix`` (no trailing slash; ``/`` matches everything) takes ``raw_path``."""
    return prefix == b"/" or raw_path == prefix or raw_path.startswith(prefix + b"/")


def _first_match(prefixes: Sequence[bytes], raw_path: bytes) -> int | None:
    for index, prefix in enumerate(prefixes):  # a plain loop: this runs for every request
        if prefix == b"/" or raw_path == prefix or raw_path.startswith(prefix + b"/"):
            return index
    return None


def pick_route(prefixes: Sequence[bytes], raw_path: bytes) -> tuple[int | None, bytes]:
    """The index of the route (``prefixes`` longest first) that takes ``raw_path``, and the path to forward.

    The path is normalised first; when that changes which route takes it, the request is refused
    (a ``Refusal``): a path's dot segments never reach another route.
    """
    if is_plain(raw_path):  # nothing to resolve: the path as it came
        return _first_match(prefixes, raw_path), raw_path
    path = remove_dot_segments(raw_path)
    chosen = _first_match(prefixes, path)
    if path is not raw_path and _first_match(prefixes, raw_path) != chosen:
        raise bad_path("the path's dot segments lead out of the route it names; send the path without them")
    return chosen, path


__all__ = ["bad_path", "is_plain", "path_pattern", "pick_route", "prefix_matches", "remove_dot_segments"]
