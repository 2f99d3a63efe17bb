"""Path normalisation and route matching (pure functions), with a property test over generated paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import Refusal
from proxy.paths import pick_route, prefix_matches, remove_dot_segments

PREFIXES = [b"/stage/a", b"/a", b"/b", b"/"]  # longest first, as the app keeps them


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/a/b/c", b"/a/b/c"),
        (b"/a/./b", b"/a/b"),
        (b"/a/b/../c", b"/a/c"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/a//b/../c", b"/a//c"),
        (b"/a/..b/c.", b"/a/..b/c."),  # not dot segments
        (b"/a/file%2ejson", b"/a/file%2ejson"),  # an encoded dot inside a name is just a name
        (b"/", b"/"),
    ],
)
def test_remove_dot_segments(raw: bytes, expected: bytes):
    assert remove_dot_segments(raw) == expected


@pytest.mark.parametrize("raw", [b"/..", b"/a/../..", b"/a/%2e%2e/b", b"/a/%2E/b", b"/a/.%2e/b", b"/%2e"])
def test_climbing_or_encoded_dot_segments_are_refused(raw: bytes):
    with pytest.raises(Refusal):
        remove_dot_segments(raw)


def test_dot_segments_cannot_cross_routes():
    # The example: route /b's token must never reach stage A.
    with pytest.raises(Refusal, match="lead out of the route"):
        pick_route(PREFIXES, b"/b/../stage/a/admin")
    with pytest.raises(Refusal):
        pick_route(PREFIXES, b"/b/../../stageA/admin")
    assert pick_route(PREFIXES, b"/b/x/../y") == (2, b"/b/y")
    assert pick_route(PREFIXES, b"/c/../d") == (3, b"/d")  # inside the catch-all route: harmless
    assert pick_route([b"/a"], b"/nothing") == (None, b"/nothing")


_SEGMENTS = st.sampled_from(["a", "b", "stage", "..", ".", "", "%2e", "%2E%2e", ".%2e", "x.y", "..a", "%2F", "-", "c"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_SEGMENTS, min_size=1, max_size=8))
def test_no_generated_path_reaches_another_route_or_leaves_its_base(segments: list[str]):
    raw = ("/" + "/".join(segments)).encode()
    literal = next((i for i, prefix in enumerate(PREFIXES) if prefix_matches(prefix, raw)), None)
    try:
        index, path = pick_route(PREFIXES, raw)
    except Refusal:
        return  # refused: nothing is forwarded
    # The route is the one the path's own leading segments name, and what is forwarded has no dot segment.
    assert index == literal
    forwarded = path.split(b"/")
    assert b".." not in forwarded and b"." not in forwarded
    assert all(b"%2e" not in s.lower() or s.lower().replace(b"%2e", b".") not in (b".", b"..") for s in forwarded)
    assert index is not None and prefix_matches(PREFIXES[index], path)
    # With the route's prefix stripped (as the forwarder does), the rest is still a path under the base path.
    rest = path[len(PREFIXES[index]) :] if PREFIXES[index] != b"/" else path
    assert rest == b"" or rest.startswith(b"/")
