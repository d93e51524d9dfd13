"""The server side of the handshake (ServerHandshake) and how a client takes a refusal."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from session_helpers import SessionPair, close_code, codecs, split_frames

from korinet.exceptions import (
    ConnectionClosedError,
    FrameTooLarge,
    NegotiationError,
    RemoteProtocolError,
)
from korinet.session import (
    CLIENT,
    CLOSED,
    CloseCode,
    HandshakeOutcome,
    PeerClosed,
    ServerHandshake,
    Session,
    SessionConfig,
)
from korinet.session.handshake import HANDSHAKE_MAX_FRAME, decode_close, encode_control
from korinet.wire.frames import PREFACE, FrameType, encode_frame
from korinet.wire.legacy import encode_v2

SERVER_CODECS = ("msgpack", "json")


def server_handshake(legacy: bool = True, config: SessionConfig | None = None) -> ServerHandshake:
    return ServerHandshake(config or SessionConfig(), SERVER_CODECS, legacy=legacy)


def hello_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "versions": [3],
        "codecs": ["msgpack", "json"],
        "heartbeat": 5.0,
        "window": 100,
        "window_bytes": 1 << 20,
        "max_frame": 1 << 16,
        "resume": None,
        "agent": "test",
    }
    for name, value in changes.items():
        if value is DROP:
            del fields[name]
        else:
            fields[name] = value
    return fields


DROP = object()


def hello_bytes(fields: dict[str, Any]) -> bytes:
    return PREFACE + encode_control(FrameType.HELLO, fields)


def client_opening_bytes(config: SessionConfig | None = None) -> bytes:
    client = Session(CLIENT, codecs(), config)
    client.connection_made(0.0)
    return client.data_to_send()


# ---------------------------------------------------------------------- HELLO


def test_real_client_hello_is_parsed_with_the_server_choices() -> None:
    config = SessionConfig(heartbeat_interval=2.5, window=77, window_bytes=12345, max_frame_size=99999)
    hs = server_handshake()
    assert hs.receive_data(client_opening_bytes(config)) is HandshakeOutcome.HELLO
    hello = hs.hello
    assert hello is not None
    assert (hello.versions, hello.codecs) == ((3,), ("msgpack", "json"))
    assert (hello.heartbeat, hello.window, hello.window_bytes, hello.max_frame) == (2.5, 77, 12345, 99999)
    assert hello.resume is None
    assert (hello.version, hello.codec) == (3, "msgpack")
    assert hs.leftover == b""
    assert hs.data_to_send() == b""


def test_hello_fed_byte_by_byte() -> None:
    wire = client_opening_bytes()
    hs = server_handshake()
    for byte in wire[:-1]:
        assert hs.receive_data(bytes([byte])) is HandshakeOutcome.NEED_DATA
    assert hs.receive_data(wire[-1:]) is HandshakeOutcome.HELLO


def test_bytes_after_the_hello_are_leftover() -> None:
    extra = encode_frame(FrameType.PING, b"\x00" * 8) + b"\x00\x00"
    hs = server_handshake()
    assert hs.receive_data(client_opening_bytes() + extra) is HandshakeOutcome.HELLO
    assert hs.leftover == extra


def test_server_codec_choice_follows_the_client_preference() -> None:
    hs = server_handshake()
    assert hs.receive_data(hello_bytes(hello_fields(codecs=["json", "msgpack"]))) is HandshakeOutcome.HELLO
    assert hs.hello is not None and hs.hello.codec == "json"


def test_resume_request_is_parsed() -> None:
    resume = {"id": "abcd", "token": "secret", "received": 17}
    hs = server_handshake()
    assert hs.receive_data(hello_bytes(hello_fields(resume=resume))) is HandshakeOutcome.HELLO
    assert hs.hello is not None and hs.hello.resume == resume


def test_integer_heartbeat_is_accepted_as_float() -> None:
    hs = server_handshake()
    assert hs.receive_data(hello_bytes(hello_fields(heartbeat=3))) is HandshakeOutcome.HELLO
    assert hs.hello is not None and hs.hello.heartbeat == 3.0 and type(hs.hello.heartbeat) is float


# ---------------------------------------------------------------------- legacy


def test_legacy_peer_detected_with_every_byte_as_leftover() -> None:
    wire = encode_v2({"hello": "v2"}) + encode_v2([1, 2])
    hs = server_handshake()
    assert hs.receive_data(wire[:2]) is HandshakeOutcome.NEED_DATA
    assert hs.receive_data(wire[2:3]) is HandshakeOutcome.NEED_DATA
    assert hs.receive_data(wire[3:]) is HandshakeOutcome.LEGACY
    assert hs.leftover == wire
    assert hs.data_to_send() == b""


@pytest.mark.parametrize("head", [b"KORX", b"kori", b"\x00\x00\x00\x35", b"KOR\x00"])
def test_any_other_first_four_bytes_are_legacy(head: bytes) -> None:
    hs = server_handshake()
    assert hs.receive_data(head) is HandshakeOutcome.LEGACY
    assert hs.leftover == head


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x35\xa2", b"GET / HTTP/1.1\r\n", b"KORX"])
def test_without_legacy_support_a_bad_preface_is_rejected(data: bytes) -> None:
    hs = server_handshake(legacy=False)
    assert hs.receive_data(data) is HandshakeOutcome.REJECTED
    assert isinstance(hs.error, RemoteProtocolError)
    assert close_code(hs.data_to_send()) == CloseCode.PROTOCOL_ERROR


def test_without_legacy_support_a_wrong_first_byte_is_rejected_at_once() -> None:
    hs = server_handshake(legacy=False)
    assert hs.receive_data(b"KO") is HandshakeOutcome.NEED_DATA  # could still be KORI
    hs = server_handshake(legacy=False)
    assert hs.receive_data(b"X") is HandshakeOutcome.REJECTED


# ---------------------------------------------------------------------- bad HELLOs

NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(hello_fields(versions=DROP), id="versions-missing"),
        pytest.param(hello_fields(versions=3), id="versions-not-list"),
        pytest.param(hello_fields(versions=["3"]), id="versions-of-str"),
        pytest.param(hello_fields(versions=[True]), id="versions-of-bool"),
        pytest.param(hello_fields(versions=[3.0]), id="versions-of-float"),
        pytest.param(hello_fields(versions=[]), id="versions-empty"),
        pytest.param(hello_fields(versions=list(range(1000))), id="versions-huge"),
        pytest.param(hello_fields(codecs=DROP), id="codecs-missing"),
        pytest.param(hello_fields(codecs="msgpack"), id="codecs-str"),
        pytest.param(hello_fields(codecs=[1]), id="codecs-of-int"),
        pytest.param(hello_fields(codecs=["c"] * 65), id="codecs-huge"),
        pytest.param(hello_fields(heartbeat=DROP), id="heartbeat-missing"),
        pytest.param(hello_fields(heartbeat="5"), id="heartbeat-str"),
        pytest.param(hello_fields(heartbeat=True), id="heartbeat-bool"),
        pytest.param(hello_fields(heartbeat=0), id="heartbeat-zero"),
        pytest.param(hello_fields(heartbeat=-1.0), id="heartbeat-negative"),
        pytest.param(hello_fields(heartbeat=NAN), id="heartbeat-nan"),
        pytest.param(hello_fields(heartbeat=INF), id="heartbeat-inf"),
        pytest.param(hello_fields(window=DROP), id="window-missing"),
        pytest.param(hello_fields(window=-5), id="window-negative"),
        pytest.param(hello_fields(window=0), id="window-zero"),
        pytest.param(hello_fields(window=1.5), id="window-float"),
        pytest.param(hello_fields(window=None), id="window-nil"),
        pytest.param(hello_fields(window_bytes=-1), id="window-bytes-negative"),
        pytest.param(hello_fields(max_frame=0), id="max-frame-zero"),
        pytest.param(hello_fields(max_frame="big"), id="max-frame-str"),
        pytest.param(hello_fields(resume=[1, 2]), id="resume-not-map"),
        pytest.param(hello_fields(resume={"id": "a", "received": 0}), id="resume-no-token"),
        pytest.param(hello_fields(resume={"id": 1, "token": "t", "received": 0}), id="resume-id-int"),
        pytest.param(hello_fields(resume={"id": "a", "token": "t", "received": -1}), id="resume-negative"),
        pytest.param(hello_fields(resume={"id": "a", "token": "t", "received": "0"}), id="resume-recv-str"),
        pytest.param(hello_fields(agent=5), id="agent-int"),
    ],
)
def test_bad_hello_fields_are_rejected_with_a_close(fields: dict[str, Any]) -> None:
    hs = server_handshake()
    assert hs.receive_data(hello_bytes(fields)) is HandshakeOutcome.REJECTED
    assert isinstance(hs.error, RemoteProtocolError)
    assert hs.hello is None
    out = hs.data_to_send()
    assert close_code(out) == CloseCode.PROTOCOL_ERROR
    _, reason, _ = decode_close(split_frames(out)[-1].body)
    assert reason == str(hs.error)
    assert hs.data_to_send() == b""  # handed out once


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(msgpack.packb([3, "msgpack"]), id="not-a-map"),
        pytest.param(b"", id="empty"),
        pytest.param(msgpack.packb(hello_fields()) + b"\x00", id="valid-map-then-trailing-bytes"),
    ],
)
def test_hello_body_that_is_not_a_map_is_rejected(body: bytes) -> None:
    hs = server_handshake()
    assert hs.receive_data(PREFACE + encode_frame(FrameType.HELLO, body)) is HandshakeOutcome.REJECTED
    assert close_code(hs.data_to_send()) == CloseCode.PROTOCOL_ERROR


def test_first_frame_other_than_hello_is_rejected() -> None:
    hs = server_handshake()
    out = hs.receive_data(PREFACE + encode_frame(FrameType.PING, b"\x00" * 8))
    assert out is HandshakeOutcome.REJECTED
    assert "HELLO" in str(hs.error)


def test_oversize_hello_is_rejected_from_its_header() -> None:
    hs = server_handshake()
    header = (HANDSHAKE_MAX_FRAME + 1).to_bytes(4, "big") + bytes([FrameType.HELLO])
    assert hs.receive_data(PREFACE + header) is HandshakeOutcome.REJECTED
    assert isinstance(hs.error, FrameTooLarge)
    assert close_code(hs.data_to_send()) == CloseCode.PROTOCOL_ERROR


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_after_the_preface_never_raises(data: bytes) -> None:
    hs = server_handshake()
    outcome = hs.receive_data(PREFACE + data)
    assert outcome in (HandshakeOutcome.NEED_DATA, HandshakeOutcome.REJECTED, HandshakeOutcome.HELLO)
    if outcome is HandshakeOutcome.REJECTED:
        assert isinstance(hs.error, RemoteProtocolError)
        assert split_frames(hs.data_to_send())[-1].type is FrameType.CLOSE


@given(
    st.dictionaries(
        st.sampled_from(list(hello_fields())),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=5)
        | st.lists(st.integers()),
    )
)
@settings(max_examples=200, deadline=None)
def test_random_hello_fields_are_accepted_or_rejected_never_raise(changes: dict[str, Any]) -> None:
    fields = hello_fields()
    fields.update(changes)
    hs = server_handshake()
    try:
        body = encode_control(FrameType.HELLO, fields)
    except (OverflowError, TypeError):
        return  # msgpack cannot carry the value; nothing to send
    outcome = hs.receive_data(PREFACE + body)
    assert outcome in (HandshakeOutcome.HELLO, HandshakeOutcome.REJECTED)
    if outcome is HandshakeOutcome.HELLO:
        hello = hs.hello
        assert hello is not None
        assert hello.heartbeat > 0 and hello.window > 0 and hello.window_bytes > 0 and hello.max_frame > 0
        assert hello.heartbeat < INF


# ---------------------------------------------------------------------- negotiation failures


def test_unsupported_version_rejected_and_the_client_learns_both_lists() -> None:
    pair = SessionPair(SessionConfig(versions=(7, 8)), SessionConfig(versions=(3, 4)))
    pair.connect()
    pair.pump()
    assert pair.rejected is not None
    assert isinstance(pair.rejected.error, NegotiationError)
    assert pair.server is None  # no session was created for it
    client = pair.client
    assert client.state is CLOSED
    assert [type(e) for e in pair.client_events] == [PeerClosed]
    assert pair.client_events[0].code == CloseCode.UNSUPPORTED_VERSION
    err = client.failure
    assert isinstance(err, NegotiationError)
    assert err.what == "protocol version"
    assert (err.local, err.remote) == ([7, 8], [3, 4])
    assert "[7, 8]" in str(err) and "[3, 4]" in str(err)


def test_unsupported_version_close_frame_lists_the_server_versions() -> None:
    hs = server_handshake(config=SessionConfig(versions=(3, 4)))
    assert hs.receive_data(hello_bytes(hello_fields(versions=[1, 2]))) is HandshakeOutcome.REJECTED
    code, _, extra = decode_close(split_frames(hs.data_to_send())[-1].body)
    assert code == CloseCode.UNSUPPORTED_VERSION
    assert extra["versions"] == [3, 4]


def test_unsupported_codec_rejected_and_the_client_learns_both_lists() -> None:
    # The client has both codecs installed but offers only json; the server only has msgpack.
    pair = SessionPair(SessionConfig(codecs=("json",)), server_codecs={"msgpack": codecs()["msgpack"]})
    pair.connect()
    pair.pump()
    assert pair.rejected is not None
    assert isinstance(pair.rejected.error, NegotiationError)
    assert pair.server is None
    assert pair.client.state is CLOSED
    assert [type(e) for e in pair.client_events] == [PeerClosed]
    assert pair.client_events[0].code == CloseCode.UNSUPPORTED_CODEC
    err = pair.client.failure
    assert isinstance(err, NegotiationError)
    assert err.what == "codec"
    assert (err.local, err.remote) == (["json"], ["msgpack"])
    assert "['json']" in str(err) and "['msgpack']" in str(err)


def test_client_offers_only_codecs_it_has_in_its_preference_order() -> None:
    client = Session(CLIENT, codecs(), SessionConfig(codecs=("json", "zstd", "msgpack")))
    client.connection_made(0.0)
    hs = server_handshake()
    assert hs.receive_data(client.data_to_send()) is HandshakeOutcome.HELLO
    assert hs.hello is not None
    assert hs.hello.codecs == ("json", "msgpack")
    assert hs.hello.codec == "json"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"code": 1003, "reason": "no", "versions": 5}, NegotiationError),
        ({"code": 1003, "reason": "no", "versions": None}, NegotiationError),
        ({"code": 1004, "reason": "no", "codecs": 1.5}, NegotiationError),
        ({"code": 1002, "reason": "bad"}, ConnectionClosedError),
    ],
)
def test_client_survives_odd_close_frames_during_the_handshake(
    fields: dict[str, Any], error: type[Exception]
) -> None:
    client = Session(CLIENT, codecs())
    client.connection_made(0.0)
    client.data_to_send()
    client.receive_data(encode_control(FrameType.CLOSE, fields), 1.0)
    assert client.state is CLOSED
    assert isinstance(client.failure, error)
    assert [type(e) for e in client.events_received()] == [PeerClosed]
