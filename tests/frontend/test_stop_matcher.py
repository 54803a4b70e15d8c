"""Stop strings: output ends just before the first stop string, wherever the pieces split."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.stop_matcher import StopMatcher


def _run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        emit, stopped = matcher.feed(piece)
        out.append(emit)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_inside_one_piece() -> None:
    assert StopMatcher(["END"]).feed("abcENDdef") == ("abc", True)


def test_stop_spanning_pieces() -> None:
    matcher = StopMatcher(["<stop>"])
    assert matcher.feed("hello <st") == ("hello ", False)
    assert matcher.feed("o") == ("", False)
    assert matcher.feed("p> tail") == ("", True)


def test_an_included_stop_string_ends_the_output() -> None:
    assert StopMatcher(["END"], include=True).feed("abcENDdef") == ("abcEND", True)
    matcher = StopMatcher(["<stop>"], include=True)
    assert matcher.feed("hello <st") == ("hello ", False)
    assert matcher.feed("op> tail") == ("<stop>", True)
    assert StopMatcher(["bc", "abcd"], include=True).feed("xabcd") == ("xabc", True)


def test_held_prefix_released_when_not_a_stop() -> None:
    matcher = StopMatcher(["<stop>"])
    assert matcher.feed("a <st") == ("a ", False)
    assert matcher.feed("ill here") == ("<still here", False)
    assert matcher.flush() == ""


def test_held_prefix_released_at_end() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("x ##") == ("x ", False)
    assert matcher.flush() == "##"


def test_first_completed_stop_wins_and_overlaps() -> None:
    # "bc" completes before "abcd" does, whether or not the "d" is in the same piece.
    assert StopMatcher(["bc", "abcd"]).feed("xabcd") == ("xa", True)
    assert StopMatcher(["bc", "abcd"]).feed("xabc") == ("xa", True)
    # Same end: the longer stop (earlier start) wins.
    assert StopMatcher(["cd", "abcd"]).feed("xabcd") == ("x", True)
    matcher = StopMatcher(["aab"])
    assert matcher.feed("aa") == ("", False)
    assert matcher.feed("aab") == ("aa", True)  # "aaaab": the stop starts at index 2


def test_stop_at_start_and_empty_stops_ignored() -> None:
    assert StopMatcher(["\n"]).feed("\nrest") == ("", True)
    assert StopMatcher(["", "z"]).feed("abc") == ("abc", False)


def test_multibyte_stop() -> None:
    matcher = StopMatcher(["🙂!"])
    assert matcher.feed("hi 🙂") == ("hi ", False)
    assert matcher.feed("!") == ("", True)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab<>x", max_size=30),
       stops=st.lists(st.text(alphabet="ab<>", min_size=1, max_size=4), min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8))
def test_any_split_matches_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    positions = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *positions, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    # Reference: the stop whose first occurrence ends first (ties: starts first).
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) != -1]
    out, stopped = _run(StopMatcher(stops), pieces)
    if hits:
        assert stopped
        assert "".join(out) == text[: min(hits)[1]]
    else:
        assert not stopped
        assert "".join(out) == text
