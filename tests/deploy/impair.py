"""A lossy, slow link in user space: netem's delay, jitter, loss and reordering between two
network interfaces, for kernels built without ``sch_netem``.

``python -m tests.deploy.impair A B --delay 0.1 --jitter 0.02 --loss 0.01 --reorder 0.1``
forwards every Ethernet frame that arrives on interface A out of B and every one that
arrives on B out of A (an AF_PACKET bridge of two ports), each IPv4 frame dropped with
probability ``loss``, sent at once (ahead of the frames delayed before it) with probability
``reorder``, else held for ``delay`` plus or minus up to ``jitter`` seconds (which reorders
too, as netem's jitter does). Other frames (ARP) pass at once. The frames the kernel handed
over with their TCP checksum left to the hardware are given one. The senders must not hand
the links segmentation-offloaded frames larger than the MTU (``ip link set DEV
gso_max_segs 1``); such a frame is counted and dropped. On SIGTERM the counts are written,
as JSON, to ``--stats``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import selectors
import signal
import socket
import time
from pathlib import Path

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
FRAME_MAX = 1514  # an MTU of 1500 and the Ethernet header


def ones_complement_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of ``data`` (RFC 1071), folded. A big number's value
    modulo 0xFFFF is the sum of its 16-bit words modulo 0xFFFF, since 0x10000 = 1 there."""
    if len(data) % 2:
        data += b"\0"
    number = int.from_bytes(data, "big")
    folded = number % 0xFFFF
    return 0xFFFF if folded == 0 and number else folded


def with_tcp_checksum(frame: bytes) -> bytes:
    """``frame`` with its IPv4 TCP segment's checksum computed, if it is one."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return frame
    ihl = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    start, end = 14 + ihl, 14 + total
    if end > len(frame) or end - start < 20:
        return frame
    segment = bytearray(frame[start:end])
    segment[16:18] = b"\0\0"
    pseudo = frame[26:34] + b"\0\x06" + len(segment).to_bytes(2, "big")
    checksum = ~ones_complement_sum(pseudo + segment) & 0xFFFF
    segment[16:18] = checksum.to_bytes(2, "big")
    return frame[:start] + bytes(segment) + frame[end:]


class Impairment:
    """The two ports, the frames held back, and what happened to each direction's frames."""

    def __init__(self, a: str, b: str, args: argparse.Namespace) -> None:
        self.args = args
        self.random = random.Random(args.seed)
        self.socks: dict[str, socket.socket] = {}
        for name in (a, b):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.bind((name, 0))
            sock.setblocking(False)
            self.socks[name] = sock
        self.out = {a: self.socks[b], b: self.socks[a]}
        self.direction = {a: f"{a}->{b}", b: f"{b}->{a}"}
        counts = ("frames", "bytes", "dropped", "reordered", "delayed", "oversize", "other")
        self.stats = {d: dict.fromkeys(counts, 0) for d in self.direction.values()}
        self.held: list[tuple[float, int, str, bytes]] = []
        self.seq = itertools.count()
        self.stopped = False

    def receive(self, name: str, now: float) -> None:
        sock = self.socks[name]
        stats = self.stats[self.direction[name]]
        args = self.args
        while True:
            try:
                frame, address = sock.recvfrom(1 << 16)
            except BlockingIOError:
                return
            if address[2] == PACKET_OUTGOING:  # our own sends, seen on the way out
                continue
            stats["frames"] += 1
            stats["bytes"] += len(frame)
            if len(frame) > FRAME_MAX:
                stats["oversize"] += 1
                continue
            if frame[12:14] != b"\x08\x00":
                stats["other"] += 1
                self.send(name, frame)
                continue
            draw = self.random.random()
            if draw < args.loss:
                stats["dropped"] += 1
                continue
            frame = with_tcp_checksum(frame)
            if draw < args.loss + args.reorder:
                stats["reordered"] += 1
                self.send(name, frame)
                continue
            stats["delayed"] += 1
            due = now + args.delay + self.random.uniform(-args.jitter, args.jitter)
            heapq.heappush(self.held, (due, next(self.seq), name, frame))

    def send(self, arrived_on: str, frame: bytes) -> None:
        try:
            self.out[arrived_on].send(frame)
        except OSError:
            self.stats[self.direction[arrived_on]]["dropped"] += 1

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for name, sock in self.socks.items():
            selector.register(sock, selectors.EVENT_READ, name)
        held = self.held
        while not self.stopped:
            wait = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
            for key, _ in selector.select(wait):
                self.receive(key.data, time.monotonic())
            now = time.monotonic()
            while held and held[0][0] <= now:
                _, _, name, frame = heapq.heappop(held)
                self.send(name, frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--jitter", type=float, default=0.02)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--reorder", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    impairment = Impairment(args.a, args.b, args)

    def stop(signum: int, frame: object) -> None:
        impairment.stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.stats.with_suffix(".ready").write_text("")
    impairment.run()
    args.stats.write_text(json.dumps(impairment.stats))


if __name__ == "__main__":
    main()
