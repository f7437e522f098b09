"""A scripted engine: publishes KV events with the real vLLM
`ZmqEventPublisher`, driven line by line from stdin (JSON commands), so a
Rust test can exercise the router's ingestion against the real publisher
(PUB + replay ROUTER, msgspec encoding).

Commands (one JSON object per line, each with an optional "id" naming the
publisher, default "a"); each is answered with one line `{"ok": true}` on
stdout once done:
  {"cmd": "start", "endpoint": "tcp://*:P", "replay": "tcp://*:R" | null,
   "rank": 0}                       create a publisher (seq starts at 0)
  {"cmd": "publish", "events": [EV, ...]}
                                    publish one KVEventBatch and wait until
                                    the publisher thread has sent it
  {"cmd": "drop", "on": bool}       while on, batches are numbered and kept
                                    for replay but not sent on the PUB socket
  {"cmd": "stop"}                   shut the publisher down (an engine exit);
                                    answered once its ports are free again
  {"cmd": "exit"}
EV: {"type": "stored", "hashes": [int | hex str], "parent": int | hex | null,
     "tokens": [int], "block_size": int, "lora_name": str | null,
     "medium": str | null, "group_idx": int | null}
    {"type": "removed", "hashes": [...], "medium": str | null,
     "group_idx": int | null}
    {"type": "cleared"}
Hex strings become bytes hashes (as vLLM publishes by default); ints stay ints
(as with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1).
"""

import json
import socket
import sys
import time

from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)


def h(v):
    if v is None or isinstance(v, int):
        return v
    return bytes.fromhex(v)


def event(e):
    if e["type"] == "stored":
        return BlockStored(
            block_hashes=[h(x) for x in e["hashes"]],
            parent_block_hash=h(e.get("parent")),
            token_ids=e["tokens"],
            block_size=e["block_size"],
            lora_id=None,
            medium=e.get("medium"),
            lora_name=e.get("lora_name"),
            group_idx=e.get("group_idx"),
        )
    if e["type"] == "removed":
        return BlockRemoved(
            block_hashes=[h(x) for x in e["hashes"]],
            medium=e.get("medium"),
            group_idx=e.get("group_idx"),
        )
    if e["type"] == "cleared":
        return AllBlocksCleared()
    raise ValueError(e["type"])


class DroppingPub:
    """Wraps the publisher's PUB socket; drops sends while `dropping`."""

    def __init__(self, sock):
        self.sock = sock
        self.dropping = False

    def send_multipart(self, frames, *a, **kw):
        if not self.dropping:
            return self.sock.send_multipart(frames, *a, **kw)
        return None

    def close(self, *a, **kw):
        return self.sock.close(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def wait_released(endpoints, timeout=30.0):
    """Waits until nothing listens on the endpoints' TCP ports any more.

    Closing a ZMQ socket only queues the unbind for the context's IO thread,
    so a publisher started right after `shutdown()` on the same ports (an
    engine restart within one process) can hit EADDRINUSE on a loaded
    machine. A plain socket with SO_REUSEADDR binds as soon as the listener
    is gone (TIME_WAIT connections do not block it).
    """
    deadline = time.monotonic() + timeout
    for ep in endpoints:
        if not ep or not ep.startswith("tcp://"):
            continue
        port = int(ep.rsplit(":", 1)[1])
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            finally:
                s.close()


def reply(**kw):
    kw["ok"] = True
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> None:
    pubs = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        c = json.loads(line)
        cmd = c["cmd"]
        pid = c.get("id", "a")
        if cmd == "start":
            pub = ZmqEventPublisher(
                data_parallel_rank=c.get("rank", 0),
                endpoint=c["endpoint"],
                replay_endpoint=c.get("replay"),
            )
            wrapper = DroppingPub(pub._pub)
            pub._pub = wrapper
            pubs[pid] = (pub, wrapper)
            reply()
        elif cmd == "publish":
            pub, _ = pubs[pid]
            pub.publish(KVEventBatch(ts=time.time(), events=[event(e) for e in c["events"]]))
            pub._event_queue.join()
            reply()
        elif cmd == "drop":
            pubs[pid][1].dropping = bool(c["on"])
            reply()
        elif cmd == "stop":
            pub, wrapper = pubs.pop(pid)
            pub._pub = wrapper.sock
            pub.shutdown()
            wait_released([pub._endpoint, pub._replay_endpoint])
            reply()
        elif cmd == "exit":
            reply()
            return
        else:
            raise ValueError(cmd)


if __name__ == "__main__":
    main()
