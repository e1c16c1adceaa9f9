"""A small Offset network of the original binaries (stindex, stnode, stctrl, stmgr), set up
as the original's own CLI test does (components/test/src/cli_tests/basic_cli.rs and
stctrl_setup.rs): two index servers that trust each other, two nodes each with an app
identity allowed everything, each node using one index server and the relays it is given,
the two nodes friends with a currency open between them, and payments by invoice.

Everything of the network listens on 127.0.0.1 of the network namespace it runs in: the
controller's (``prefix=()``) or a node host's (``prefix=("ip", "netns", "exec", NAME)``,
whose loopback is its own). Only the nodes' connections to the relays leave it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import stop_process

CURRENCY = "FST"
FRIENDS_ONLINE = 180.0  # s: a liveness deadline for friends to come online
ROUTE = 120.0  # s: for the index servers to know a route for a payment
RECEIPT = 60.0  # s: for a paid invoice's receipt
PAY_ATTEMPT = 5.0  # s: for one attempt to pay, while the index servers know no route


def run(
    args: Sequence[object], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}{result.stdout}")
    return result


def poll(what: str, check: Callable[[], bool], timeout: float, every: float = 0.2) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - started


class Daemon:
    """An original daemon (stindex or stnode) in the network's namespace, its log in a file."""

    def __init__(self, args: Sequence[object], log: Path) -> None:
        self.log = log
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def stop(self) -> None:
        stop_process(self.proc)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@dataclass
class Payment:
    """A payment made: who paid whom, how much, the seconds it took from the first pay
    attempt to the receipt, and the balances each side saw before and after."""

    buyer: str
    seller: str
    amount: int
    seconds: float
    attempts: int
    balances_before: dict[str, int]
    balances_after: dict[str, int]


class Node:
    """An original stnode with the app identity ``stctrl`` uses to run it."""

    def __init__(self, net: OriginalNetwork, name: str, port: int) -> None:
        self.net, self.name, self.port = net, name, port
        self.folder = net.folder / name
        (self.folder / "trusted").mkdir(parents=True)
        self.ident = self.folder / f"{name}.ident"
        self.app = self.folder / "app.ident"
        self.ticket = self.folder / f"{name}.ticket"
        self.friend_ticket = self.folder / f"{name}.friend"
        stmgr = net.original / "stmgr"
        run([stmgr, "gen-ident", "--output", self.ident])
        run([stmgr, "gen-ident", "--output", self.app])
        run([stmgr, "init-node-db", "--idfile", self.ident, "--output", self.folder / "node.db"])
        run([stmgr, "node-ticket", "--idfile", self.ident, "--address",
             f"127.0.0.1:{port}", "--output", self.ticket])  # fmt: skip
        run([stmgr, "app-ticket", "--idfile", self.app, "--output",
             self.folder / "trusted" / "app.ticket", "--proutes", "--pbuyer", "--pseller",
             "--pconfig"])  # fmt: skip
        self.daemon = net.start(
            [net.original / "stnode", "--idfile", self.ident, "--laddr", f"127.0.0.1:{port}",
             "--database", self.folder / "node.db", "--trusted", self.folder / "trusted"],
            self.folder / "stnode.log",
        )  # fmt: skip

    def ctrl(
        self, *args: object, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """stctrl with ``args``. It exits 0 after an error too, which it logs as
        ``ERROR stctrl] error: ...``: such a result is given exit status 1 here."""
        result = run(
            [*self.net.prefix, self.net.original / "stctrl", "--idfile", self.app,
             "--ticket", self.ticket, *args],
            check=False,
            timeout=timeout,
        )  # fmt: skip
        if result.returncode == 0 and "ERROR stctrl] error:" in result.stderr:
            result.returncode = 1
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: stctrl {args} failed: {result.stderr}")
        return result

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.daemon.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.daemon.tail()}")
            return self.ctrl("info", "friends", check=False).returncode == 0

        poll(f"stctrl to reach {self.name}", answers, 30)

    def friends(self) -> str:
        return self.ctrl("info", "friends").stdout

    def balance(self, friend: str) -> int:
        """The balance of ``CURRENCY`` with ``friend`` in this node's ``info friends``."""
        table = self.friends()
        match = re.search(rf"\|\s*{re.escape(friend)}\s*\|.*?- {CURRENCY}: B  =(-?\d+)", table,
                          re.S)  # fmt: skip
        assert match, table
        return int(match.group(1))


class OriginalNetwork:
    """Two index servers and two nodes in ``folder`` (all of it removed by the caller's
    temporary directory), started with ``prefix`` in front of each command."""

    def __init__(
        self,
        original: Path,
        folder: Path,
        prefix: Sequence[str] = (),
        ports: Callable[[], int] | None = None,
    ) -> None:
        self.original, self.folder, self.prefix = original, folder, tuple(prefix)
        self.daemons: list[Daemon] = []
        self.nodes: list[Node] = []
        self.indexes: list[Path] = []  # each index server's client ticket
        self._ports = ports or _counter(24000)

    def start(self, args: Sequence[object], log: Path) -> Daemon:
        daemon = Daemon([*self.prefix, *args], log)
        self.daemons.append(daemon)
        return daemon

    def listening(self, port: int) -> bool:
        out = run([*self.prefix, "ss", "-Hltn", f"sport = :{port}"]).stdout
        return bool(out.strip())

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {d.log.parent.name}\n{d.tail()}" for d in self.daemons)

    # ---- set-up --------------------------------------------------------------------------

    def start_index_servers(self) -> None:
        """index0 and index1, each trusting the other's server ticket (stctrl_setup.rs)."""
        stmgr = self.original / "stmgr"
        names = ("index0", "index1")
        ports = {name: (self._ports(), self._ports()) for name in names}
        for name in names:
            (self.folder / name / "trusted").mkdir(parents=True)
            run([stmgr, "gen-ident", "--output", self.folder / name / f"{name}.ident"])
        for name, other in zip(names, names[::-1], strict=True):
            ident = self.folder / name / f"{name}.ident"
            client, server = ports[name]
            ticket = self.folder / name / f"{name}_client.ticket"
            run([stmgr, "index-ticket", "--idfile", ident, "--address", f"127.0.0.1:{client}",
                 "--output", ticket])  # fmt: skip
            self.indexes.append(ticket)
            trusted = self.folder / other / "trusted" / f"{name}_server.ticket"
            run([stmgr, "index-ticket", "--idfile", ident, "--address", f"127.0.0.1:{server}",
                 "--output", trusted])  # fmt: skip
        for name in names:
            client, server = ports[name]
            daemon = self.start(
                [self.original / "stindex", "--idfile", self.folder / name / f"{name}.ident",
                 "--lclient", f"127.0.0.1:{client}", "--lserver", f"127.0.0.1:{server}",
                 "--trusted", self.folder / name / "trusted"],
                self.folder / name / "stindex.log",
            )  # fmt: skip

            def up(daemon: Daemon = daemon, client: int = client, server: int = server) -> bool:
                if daemon.proc.poll() is not None:
                    raise AssertionError(f"stindex exited:\n{daemon.tail()}")
                return self.listening(client) and self.listening(server)

            poll(f"{name} to listen", up, 30)

    def start_nodes(self) -> None:
        for i in (0, 1):
            self.nodes.append(Node(self, f"node{i}", self._ports()))
        for node in self.nodes:
            node.wait_ready()
            assert "No configured friends" in node.friends()

    def befriend(self, relay_ticket: Path) -> float:
        """Each node given the relay and its index server, the two made friends with
        ``CURRENCY`` (rate set, enabled); the seconds from enabling them to both seeing the
        other enabled and online (``E+``). Then the currency is opened both ways."""
        a, b = self.nodes
        for node, index in zip(self.nodes, self.indexes, strict=True):
            node.ctrl("config", "add-relay", "--relay", relay_ticket, "--name", "relay")
            node.ctrl("config", "add-index", "--index", index, "--name", index.stem)
            node.ctrl("info", "export-ticket", "--ticket", node.friend_ticket)
        for node, other in ((a, b), (b, a)):
            node.ctrl("config", "add-friend", "--friend", other.friend_ticket, "--name",
                      other.name)  # fmt: skip
            node.ctrl("config", "set-currency-rate", "--name", other.name, "--currency",
                      CURRENCY, "--mul", "0", "--add", "1")  # fmt: skip
        started = time.monotonic()
        for node, other in ((a, b), (b, a)):
            node.ctrl("config", "enable-friend", "--name", other.name)
        self.wait_online(FRIENDS_ONLINE)
        took = time.monotonic() - started
        for node, other in ((a, b), (b, a)):
            node.ctrl("config", "open-currency", "--name", other.name, "--currency", CURRENCY)
            # Each lets the other owe it up to 1000: payments can go both ways.
            node.ctrl("config", "set-currency-max-debt", "--name", other.name, "--currency",
                      CURRENCY, "--mdebt", "1000")  # fmt: skip
        return took

    def online(self) -> bool:
        """Both nodes see the other enabled and online."""
        a, b = self.nodes
        return all(
            re.search(rf"E\+\s*\|\s*{other.name}\s*\|", node.friends())
            for node, other in ((a, b), (b, a))
        )

    def wait_online(self, timeout: float) -> None:
        try:
            poll("the friends to be enabled and online", self.online, timeout, 0.5)
        except AssertionError as error:
            tables = "\n".join(node.friends() for node in self.nodes)
            raise AssertionError(f"{error}\n{tables}\n{self.logs()}") from None

    # ---- payments ------------------------------------------------------------------------

    def pay(self, buyer: Node, seller: Node, amount: int, tag: str) -> Payment:
        """As basic_cli.rs's pay_invoice: the seller makes an invoice, the buyer pays it
        (again while no route is known yet), the seller commits, the buyer waits for the
        receipt. The balances each side sees with the other move by ``amount``."""
        folder = self.folder / "payments" / tag
        folder.mkdir(parents=True)
        invoice, payment = folder / "invoice", folder / "payment"
        commit, receipt = folder / "commit", folder / "receipt"
        before = {buyer.name: buyer.balance(seller.name), seller.name: seller.balance(buyer.name)}
        seller.ctrl("seller", "create-invoice", "--currency", CURRENCY, "--amount", amount,
                    "--invoice", invoice)  # fmt: skip
        started = time.monotonic()
        attempts = 0
        errors: list[str] = []

        def paid() -> bool:
            # stctrl waits for ever on an index server that knows no route yet (buyer.rs,
            # request_routes ignores a failed answer): each attempt gets PAY_ATTEMPT seconds.
            # The payment file is written only once a route is known, so a cut attempt
            # has paid nothing and can be made again.
            nonlocal attempts
            attempts += 1
            try:
                result = buyer.ctrl("buyer", "pay-invoice", "--invoice", invoice, "--payment",
                                    payment, "--commit", commit, check=False,
                                    timeout=PAY_ATTEMPT)  # fmt: skip
            except subprocess.TimeoutExpired:
                assert not payment.exists(), f"{tag}: stctrl hung after it started paying"
                errors.append(f"no route within {PAY_ATTEMPT:.0f} s")
                return False
            if result.returncode != 0:
                errors.append(result.stderr.strip() or result.stdout.strip())
            return result.returncode == 0

        try:
            poll(f"{buyer.name} to pay {seller.name}", paid, ROUTE, 0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}; last errors {errors[-3:]}\n{self.logs()}") from None
        seller.ctrl("seller", "commit-invoice", "--invoice", invoice, "--commit", commit)

        status: list[str] = []

        def receipt_saved() -> bool:
            out = buyer.ctrl("buyer", "payment-status", "--payment", payment, "--receipt",
                             receipt).stdout  # fmt: skip
            status.append(out.strip())
            assert "canceled" not in out, f"{tag}: {out}\n{self.logs()}"
            return "Saving receipt to file." in out

        try:
            poll(f"the receipt of {tag}", receipt_saved, RECEIPT)
        except AssertionError as error:
            raise AssertionError(f"{error}; status {status[-1:]}\n{self.logs()}") from None
        seconds = time.monotonic() - started
        assert receipt.is_file() and not payment.exists()
        verified = run([self.original / "stverify", "verify-receipt", "--invoice", invoice,
                        "--receipt", receipt])  # fmt: skip
        assert "is valid!" in verified.stdout, verified.stdout
        after = {buyer.name: buyer.balance(seller.name), seller.name: seller.balance(buyer.name)}
        assert after[buyer.name] == before[buyer.name] - amount, (before, after)
        assert after[seller.name] == before[seller.name] + amount, (before, after)
        return Payment(buyer.name, seller.name, amount, seconds, attempts, before, after)


def _counter(start: int) -> Callable[[], int]:
    """Ports from ``start`` up: for a namespace of the network's own, where all are free."""
    state = [start]

    def take() -> int:
        state[0] += 1
        return state[0]

    return take
