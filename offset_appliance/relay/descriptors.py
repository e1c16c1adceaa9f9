"""The relay's descriptor limit (RLIMIT_NOFILE) against ``limits.max_connections``.

Every connection is a descriptor, and so is every closed one still lingering (at most
``MAX_LINGERING``), every listening socket and the metrics endpoint's. A shell usually
starts a process with a soft limit of 1,024 and a much higher hard limit: a relay run by
hand would refuse connections past about a thousand. As Go's runtime and nginx do, the
relay raises its soft limit towards the hard one, as far as its configuration needs, and
says in one line when even the hard limit is short (under systemd: ``LimitNOFILE=``).
"""

from __future__ import annotations

import resource

from .linger import MAX_LINGERING

# Listening sockets, the metrics endpoint and its clients, logs, the state files.
SPARE = 64


def needed(max_connections: int) -> int:
    """Descriptors a relay with ``max_connections`` may hold at once."""
    return max_connections + MAX_LINGERING + SPARE


def fit(max_connections: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to what ``max_connections`` needs (within the hard
    limit); a warning if the limit stays below ``max_connections`` itself, else None (the
    spare descriptors are a margin: past the limit the relay sheds new connections)."""
    want = needed(max_connections)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - not on Linux
        return None
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # left as it is: the warning below says what it is
    if soft == resource.RLIM_INFINITY or soft >= max_connections:
        return None
    return (
        f"limits.max_connections is {max_connections}, but this process may open only {soft:,}"
        " descriptors (RLIMIT_NOFILE; under systemd LimitNOFILE=), one per connection:"
        f" connections past that are refused; raise LimitNOFILE= to {want:,} or more"
        " (systemctl edit offset-relay) or lower max_connections"
    )
