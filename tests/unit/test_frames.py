"""Frames: an 8-byte big-endian length, a maximum enforced before the body is buffered."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.frames import VIEW_MIN, FrameDecoder, encode_frame, frame_header


def _feed_in_cuts(feed, stream: bytes, cuts: list[int]) -> list:
    """The frames ``feed`` returns for ``stream`` given in pieces of the ``cuts`` in turn."""
    got, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += feed(stream[pos : pos + step])
        pos += step
        i += 1
    return got


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40),
)
def test_any_split_of_the_stream_gives_the_same_frames(bodies, cuts):
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(1000)
    got = _feed_in_cuts(decoder.feed, stream, cuts)
    assert got == bodies
    assert decoder.buffered == 0


def test_zero_length_frame_is_legal():
    assert FrameDecoder().feed(frame_header(0)) == [b""]


def test_oversize_length_is_refused_from_the_header_alone():
    decoder = FrameDecoder(1024)
    assert decoder.feed(frame_header(1024) + b"x" * 10) == []
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder(1024).feed(frame_header(1025))


def test_huge_length_prefix_does_not_allocate():
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\xff" * 8)


def test_partial_frame_is_kept_until_complete():
    decoder = FrameDecoder()
    frame = encode_frame(b"a" * 100_000)
    for i in range(0, len(frame) - 1, 4096):
        assert decoder.feed(frame[i : min(i + 4096, len(frame) - 1)]) == []
    assert decoder.feed(frame[-1:]) == [b"a" * 100_000]


def test_setup_frames_are_held_to_their_own_limit_from_the_header_on():
    decoder = FrameDecoder(1 << 20, setup_frames=3, setup_length=1024)
    assert decoder.feed(encode_frame(b"v" * 4) + encode_frame(b"n" * 1024)) == [
        b"v" * 4,
        b"n" * 1024,
    ]
    # The third frame's header alone is refused: its body is never buffered.
    with pytest.raises(ProtocolError, match="exceeds the maximum of 1024"):
        decoder.feed(frame_header(1 << 20))


def test_frames_after_the_setup_ones_get_the_full_limit_even_in_the_same_read():
    setup = [b"v" * 4, b"n" * 100, b"d" * 1000]
    big = b"x" * 500_000
    stream = b"".join(encode_frame(body) for body in [*setup, big, b"y"])
    for cut in (1, 7, 9, 1117, 1130, len(stream)):
        decoder = FrameDecoder(1 << 20, setup_frames=3, setup_length=1024)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == [*setup, big, b"y"]
        assert decoder.buffered == 0


@given(
    st.lists(st.binary(max_size=300) | st.binary(min_size=4090, max_size=5000), max_size=8),
    st.lists(st.integers(min_value=1, max_value=6000), min_size=1, max_size=10),
)
def test_views_give_the_same_frames_and_large_ones_as_views(bodies, cuts):
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(10000)
    got = _feed_in_cuts(decoder.feed_views, stream, cuts)
    assert [bytes(frame) for frame in got] == bodies
    assert [type(frame) for frame in got] == [
        memoryview if len(b) >= VIEW_MIN else bytes for b in bodies
    ]
    assert decoder.buffered == 0
    # What is kept of a partial frame is a copy, not a view of the read.
    decoder.feed_views(stream + frame_header(5000) + b"x" * 10)
    assert all(type(chunk) is bytes for chunk in decoder._chunks)
