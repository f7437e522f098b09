"""kvbm's Unix socket serves stock gRPC clients.

grpc-core (Python ``grpcio``, C++) sends the socket's path as ``:authority``,
which the HTTP/2 layer under kvbm would refuse as malformed; kvbm accepts it
(``kvtier_net::FixAuthority``). Raw protobuf bytes keep this test free of
generated stubs.
"""

import grpc


def _register(name: bytes, block_bytes: int) -> bytes:
    # RegisterNamespaceRequest{name = 1, block_bytes = 2}
    assert len(name) < 128 and block_bytes < 1 << 14
    return (
        b"\x0a" + bytes([len(name)]) + name
        + b"\x10" + bytes([0x80 | (block_bytes & 0x7F), block_bytes >> 7])
    )


def test_grpcio_on_the_unix_socket(daemon):
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    register = channel.unary_unary("/kvtier.v1.Kvbm/RegisterNamespace", **identity)
    listing = channel.unary_unary("/kvtier.v1.Kvbm/ListNamespaces", **identity)
    stats = channel.unary_unary("/kvtier.v1.Kvbm/Stats", **identity)
    # Several calls on one connection: later requests refer to headers the
    # client put in its HPACK dynamic table with the first.
    for i in range(3):
        reply = register(_register(f"py{i}".encode(), 4096), timeout=10)
        assert f"py{i}".encode() in reply
        stats(b"", timeout=10)
    names = listing(b"", timeout=10)
    for i in range(3):
        assert f"py{i}".encode() in names
    channel.close()
