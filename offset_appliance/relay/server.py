"""The relay service: the rooms put together, and what a running relay says to systemd, to
``/metrics`` and to the log.

- ``Loop`` (relay/loop.py) waits, serves fairly, runs timers, signals and the watchdog;
- ``Relay`` (relay/relay.py) owns the connections and applies every action;
- ``Policy`` (relay/policy.py, the relay's ``policy``) is every operator control;
- ``Listeners`` (relay/listening.py), reload (relay/reload.py) and the hand-over
  (relay/handover.py) each have a room of their own.

Time comes from ``clock``, which tests replace; it is read once per phase of a turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nacl.signing import SigningKey

from ..config import Config, format_address
from ..errors import ConfigError
from ..files import b64url_encode
from .clients import Client
from .core import RelayCore
from .handover import Handover, Inherited, ServiceManager
from .listening import BindError
from .loop import Loop, LoopSelector
from .memory import read_rss
from .metrics import MetricsEndpoint, Snapshot, Stats, render
from .notify import Notifier
from .policy import Policy
from .relay import Relay
from .reload import ReloadFailed, read_again, say_changes

__all__ = ["BindError", "RelayServer", "run", "start_config"]

log = logging.getLogger("strelay")

# How often systemd's STATUS= is sent, expiries run and the controls keep house.
STATUS_INTERVAL = 2.0
# How often the STATUS= summary is also written to the log, at info.
STATUS_LOG_INTERVAL = 300.0

Clock = Callable[[], float]


class RelayServer:
    """A relay listening on the configured addresses, serving until ``stop`` is called."""

    def __init__(
        self,
        config: Config,
        identity: SigningKey,
        *,
        reload_config: Callable[[], Config] | None = None,
        clock: Clock = time.monotonic,
        rss: Callable[[], int] = read_rss,
    ) -> None:
        self.config = config
        self.clock = clock
        self._reload_config = reload_config
        self.selector = LoopSelector()
        self.stats = Stats()
        self.notifier = Notifier()
        self.relay = Relay(config, identity, self.selector, self.stats, clock(), rss=rss)
        self.loop = Loop(
            self.selector,
            self.relay,
            clock,
            on_turn_end=self._turn_ended,
            on_reload=self._reload,
            notify=self.notifier.notify,
        )
        self.reload_error = ""  # why the last reload was refused; "" once one succeeds
        # Serving with the hand-over's configuration, the files not loading at the start:
        # until a reload succeeds.
        self.config_from_handover = False
        self._next_status = 0.0
        self._next_status_log = 0.0
        self._refusals = self.relay.policy.refusals
        self.metrics: MetricsEndpoint | None = None
        # Run by systemd: hand connections over on stop instead of closing them.
        self.handover: Handover | None = None

    # ---- what tests and the service read -----------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.relay.public_key

    @property
    def identity(self) -> SigningKey:
        return self.relay.identity

    @property
    def clients(self) -> dict[int, Client]:
        """The open connections by id (the relay's table)."""
        return self.relay.clients

    @property
    def policy(self) -> Policy:
        """Every operator control (the relay's)."""
        return self.relay.policy

    @property
    def core(self) -> RelayCore:
        """The protocol's rules (the relay's)."""
        return self.relay.core

    # ---- set-up ------------------------------------------------------------------------

    def bind(self, inherited: Inherited | None = None) -> list[tuple[str, int]]:
        """Open the listening sockets, or take them from ``inherited`` (the service
        manager's store), and the metrics endpoint; returns the bound addresses."""
        listeners = self.relay.listeners
        bound = listeners.bind(self.config.listen, inherited)
        if self.config.metrics.enabled:
            host, port = self.config.metrics.listen
            try:
                self.metrics = MetricsEndpoint(
                    self.selector, (host, port), self.metrics_text, self.stats
                )
            except OSError as exc:
                raise BindError(host, port, exc, kind="metrics") from None
            # Out of descriptors, the metrics listener is paused with the relay's own.
            metrics = self.metrics
            listeners.also_paused.append(metrics)
            metrics.out_of_descriptors = lambda exc, now: listeners.shed(metrics.sock, exc, now)
        return bound

    def stop(self) -> None:
        """Ask the loop to end (from a signal handler or another thread)."""
        self.loop.stop()

    def request_reload(self) -> None:
        """Re-read the configuration at the end of the current turn (as SIGHUP does)."""
        self.loop.request_reload()

    def step(self, timeout: float = 1.0) -> int:
        """One turn of the loop (relay/loop.py); returns the sockets that had events."""
        return self.loop.step(timeout)

    def serve_forever(self) -> None:
        """Run until stopped; then hand the connections over, or close every one."""
        loop = self.loop
        loop.install_signals()
        self.relay.listeners.start()
        loop.watchdog = self.notifier.watchdog_interval() or 0.0
        loop.run()
        now = self.clock()
        self.relay.policy.stop(now)
        if self.handover is not None:
            self.notifier.notify("STOPPING=1")
            if self.handover.hand_over(self.relay, now, self.config):
                self._close_metrics()
                loop.close()
                return
        self.shutdown()
        loop.close()

    def shutdown(self) -> None:
        """Stop listening and close every connection (``serve_forever`` ends with this)."""
        self.notifier.notify("STOPPING=1")
        self._close_metrics()
        self.relay.shutdown(self.clock())
        log.info("stopped")

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # ---- every few seconds, and on reload ----------------------------------------------

    def _turn_ended(self, now: float) -> None:
        self._refusals.say_new(now)  # a first refusal line, a second after its spell began
        if now >= self._next_status:
            self.notifier.notify("STATUS=" + self.status_text())
            self._next_status = now + STATUS_INTERVAL
            if self.metrics is not None:
                self.metrics.expire(now)
            self.relay.policy.housekeeping(now)
        if now >= self._next_status_log:
            log.info("status: %s", self.status_line())
            self._next_status_log = now + STATUS_LOG_INTERVAL

    def _reload(self) -> None:
        """Read the configuration again; apply all of it, or none of it if it is bad."""
        if self._reload_config is None:
            log.info("reload requested, but the relay runs without a config file")
            return
        try:
            config, changes = read_again(self.config, self._reload_config)
        except ReloadFailed as exc:
            # One line in the log, the verdict in STATUS= and the metric; nothing applied.
            reason = str(exc)
            log.error("reload failed, keeping the running configuration: %s", reason)
            self.reload_error = reason
            self.stats.reload_successful = False
            self.notifier.notify("STATUS=" + self.status_text())
            return
        old_level = logging.getLogger().level
        # Nothing here may fail: ``load_config`` has checked everything. Limits and
        # timeouts apply to what happens from now on, the log level at once.
        self.config = config
        done = self.relay.apply(config, self.clock())
        logging.getLogger().setLevel(config.log_level.upper())
        self.reload_error = ""
        self.config_from_handover = False
        self.stats.reload_successful = True
        self.stats.reload_success_time = time.time()
        say_changes(changes, old_level, done)
        self.notifier.notify("STATUS=" + self.status_text())

    def kept_handover_config(self, reason: str) -> None:
        """Started with the configuration the hand-over carried, the files not loading for
        ``reason``: one error line, and the verdict in STATUS= and the reload metric (0)
        until a reload reads good files."""
        reason = " ".join(reason.split())
        log.error(
            "configuration not loaded: %s; serving with the configuration of the previous "
            "process (the hand-over's) until a reload or restart reads good files",
            reason,
        )
        self.reload_error = reason
        self.config_from_handover = True
        self.stats.reload_successful = False
        self.notifier.notify("STATUS=" + self.status_text())

    # ---- status and metrics ------------------------------------------------------------

    def status_text(self) -> str:
        """systemd's STATUS=: after a refused reload, first the reason (until a reload
        succeeds), then the headline counts."""
        failed = ""
        if self.config_from_handover:
            failed = f"configuration not loaded, serving the hand-over's: {self.reload_error}; "
        elif self.reload_error:
            failed = f"reload failed: {self.reload_error}; "
        return failed + self.status_line()

    def status_line(self) -> str:
        """The headline counts, as systemd's STATUS= shows them (the same as /metrics)."""
        stats = self.stats
        relay = self.relay
        core = relay.core
        return (
            f"{len(relay.clients)} connections, {len(relay.policy.handshaking)} handshaking, "
            f"{core.listener_count} listening, {core.half_tunnel_count} half-tunnels, "
            f"{core.tunnels} tunnels, {stats.bytes_relayed / 1e6:.1f} MB relayed, "
            f"{stats.handshakes_failed_total} failed handshakes, "
            f"{sum(stats.refused.values())} refused by limits"
        )

    def snapshot(self) -> Snapshot:
        """Gauges for a scrape; walks the connections, so only at scrape time."""
        relay = self.relay
        core = relay.core
        now = self.clock()
        return Snapshot(
            connections=relay.connection_counts(),
            listeners=core.listener_count,
            half_tunnels=core.half_tunnel_count,
            tunnels=core.tunnels,
            rekeys_live=sum(client.wire.rekeys for client in relay.clients.values()),
            **relay.policy.gauges(now),  # type: ignore[arg-type]
        )

    def metrics_text(self) -> str:
        """The Prometheus exposition of the relay's counters and gauges."""
        return render(self.stats, self.snapshot())


def start_config(load: Callable[[], Config], inherited: Inherited) -> tuple[Config, str]:
    """The configuration to start with, and why the files were not used ("" if they were).

    ``load`` reads the files; if they do not load (``ConfigError``) and the hand-over
    carries the configuration the previous process ran with, that one, with the reason.
    Without one, the ``ConfigError`` is raised: the start fails."""
    try:
        return load(), ""
    except ConfigError as exc:
        carried = inherited.carried_config()
        if carried is None:
            raise
        return carried, str(exc) or type(exc).__name__


def run(
    config: Config,
    identity: SigningKey,
    *,
    reload_config: Callable[[], Config] | None = None,
    announce: Callable[[], None] | None = None,
    inherited: Inherited | None = None,
    config_error: str = "",
) -> int:
    """Serve with ``config`` until SIGTERM or SIGINT; returns the process exit code.

    ``inherited``: what the service manager handed over (by default, taken from the
    environment). ``config_error``: why ``config`` is the hand-over's, not the files'."""
    server = RelayServer(config, identity, reload_config=reload_config)
    manager = ServiceManager.from_environment()
    if inherited is None:
        inherited = Inherited.from_environment()
    try:
        bound = server.bind(inherited)
    except BindError:
        inherited.close_rest()
        raise  # the caller explains it, in one line
    if manager is not None:
        server.handover = Handover(manager)
        server.handover.started(server.relay, inherited, server.clock())
    else:
        inherited.close_rest()  # nothing to hand back to without a service manager
    if config_error:
        server.kept_handover_config(config_error)
    if announce is not None:
        announce()  # more start-up lines, once the sockets are open
    for host, port in bound:
        log.info("listening on %s", format_address(host, port))
    if server.metrics is not None:
        log.info("metrics on http://%s/metrics", format_address(*server.metrics.address))
    log.info("relay public key %s", b64url_encode(server.public_key))
    log.info("%s", server.policy.memory.describe())
    server.notifier.notify("READY=1\nSTATUS=" + server.status_text())
    server.serve_forever()
    return 0
