"""Path normalisation and route matching (pure functions), with a property test over generated paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import Refusal
from proxy.paths import path_pattern, pick_route, prefix_matches, remove_dot_segments

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


@pytest.mark.parametrize(
    "raw",
    [
        b"/r/orders/x/..;/..;/admin",
        b"/r/orders/..;x/admin",
        b"/r/a/..%2fadmin",
        b"/r/a/..%5Cadmin",
        b"/r/a/..\\admin",
        b"/r/a\\..\\admin",
        b"/r/%252e%252e/admin",
        b"/r/%c0%ae%c0%ae/admin",
        b"/r/%e0%80%ae%e0%80%ae/admin",
        b"/r/a%c0%afadmin",
        b"/r/admin%00.json",
    ],
)
def test_forms_other_servers_read_as_dot_segments_are_refused(raw: bytes):
    with pytest.raises(Refusal, match="dot segment or a separator") as refused:
        pick_route([b"/r", b"/"], raw)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")


@pytest.mark.parametrize("raw", [b"/r/orders/1.json", b"/r/a%20b", b"/r/a/..b", b"/r/x/...", b"/r/v1.2/items"])
def test_plain_paths_with_dots_and_escapes_pass(raw: bytes):
    assert pick_route([b"/r", b"/"], raw) == (0, raw)


def test_a_star_matches_one_segment_and_two_stars_any_depth():
    one, deep = path_pattern("/r/orders/*"), path_pattern("/r/orders/**")
    assert one.fullmatch("/r/orders/7") and not one.fullmatch("/r/orders/7/items")
    assert not one.fullmatch("/r/orders/x/../admin")
    assert deep.fullmatch("/r/orders/7/items") and not deep.fullmatch("/r/admin")
    assert path_pattern("/r/item-?").fullmatch("/r/item-7") and not path_pattern("/r/item-?").fullmatch("/r/item-/")
    assert path_pattern("/r/a.b").fullmatch("/r/a.b") and not path_pattern("/r/a.b").fullmatch("/r/aXb")
