"""A second engine process (same hash seed): does it find A's blocks, and
load the same bytes? Prints one JSON line."""

import json
import sys

import torch
from engine import Engine


def main() -> None:
    socket, tokens = sys.argv[1], json.loads(sys.argv[2])
    eng = Engine(socket)
    r = eng.request("B2", tokens)
    matched, is_async = eng.scheduler.get_num_new_matched_tokens(r, 0)
    identical = False
    if matched:
        eng.allocate(r, matched)
        out = eng.step()
        n = len(r.block_hashes)
        identical = out.finished_recving == {"B2"} and all(
            torch.equal(eng.block_bytes(eng.blocks["B2"][i]), eng.expected(r.block_hashes[i]))
            for i in range(n)
        )
    eng.shutdown()
    print(json.dumps({"matched": matched, "async": is_async, "identical": identical}))


if __name__ == "__main__":
    main()
