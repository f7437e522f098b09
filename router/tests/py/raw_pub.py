"""A raw pyzmq PUB (and replay ROUTER) sending frames the Rust test crafts,
for malformed-input tests. Commands, one JSON object per stdin line, each
answered by one line `{"ok": true}`:
  {"cmd": "bind", "endpoint": "tcp://127.0.0.1:P"}
  {"cmd": "connect", "endpoint": "tcp://127.0.0.1:P"}   (PUB connecting to a bound SUB)
  {"cmd": "send", "frames": [hex, ...]}
  {"cmd": "send_huge", "seq": int, "bytes": int}   [b"", seq, N bytes of 0x90]
  {"cmd": "exit"}
"""

import json
import sys

import zmq


def main() -> None:
    ctx = zmq.Context.instance()
    pub = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        c = json.loads(line)
        if c["cmd"] == "bind":
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 1000)
            pub.bind(c["endpoint"])
        elif c["cmd"] == "connect":
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 1000)
            pub.connect(c["endpoint"])
        elif c["cmd"] == "send":
            pub.send_multipart([bytes.fromhex(f) for f in c["frames"]])
        elif c["cmd"] == "send_huge":
            pub.send_multipart(
                [b"", c["seq"].to_bytes(8, "big"), b"\x90" * c["bytes"]]
            )
        elif c["cmd"] == "exit":
            sys.stdout.write('{"ok": true}\n')
            sys.stdout.flush()
            return
        sys.stdout.write('{"ok": true}\n')
        sys.stdout.flush()


if __name__ == "__main__":
    main()
