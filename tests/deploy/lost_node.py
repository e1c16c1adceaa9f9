"""The peers of a node host that will vanish (test_network_faults.py), run in its own
network namespace: an idle listener, a connector whose connect stays pending, and one end
of a tunnel streaming numbered messages as fast as it can, all keeping the keepalive rule.

``python -m tests.deploy.lost_node RELAY_HOST PORT RELAY_KEY KEEPALIVE LISTEN PENDING TUNNEL``
(keys and seeds in hex; PENDING and TUNNEL as SEED:LISTENER_KEY). Prints, every 0.2 s, one
JSON line of what each peer has seen, until it is killed.
"""

from __future__ import annotations

import json
import sys
import time

from nacl.signing import SigningKey

from offset_appliance.wire.messages import Connect, Listen, encode_init_connection

from .restart_load import Load


def main(argv: list[str]) -> None:
    host, port, relay_key, keepalive, listen, pending, tunnel = argv
    load = Load((host, int(port)), bytes.fromhex(relay_key), float(keepalive))
    load.open_peer("idle", SigningKey(bytes.fromhex(listen)), encode_init_connection(Listen()))
    for name, spec in (("pending", pending), ("tunnel", tunnel)):
        seed, listener = spec.split(":")
        load.open_peer(
            name,
            SigningKey(bytes.fromhex(seed)),
            encode_init_connection(Connect(bytes.fromhex(listener))),
        )
    idle, waiting, end = load.peers
    load.add_bulk_end(end, 0, 0)
    load.start()
    while True:
        status = {
            p.name: {"closed": p.closed, "sent": p.sent, "received": p.expected, "bad": p.bad[:3]}
            for p in (idle, waiting, end)
        }
        status["pending"]["inbox"] = len(waiting.inbox)
        print(json.dumps(status), flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1:])
