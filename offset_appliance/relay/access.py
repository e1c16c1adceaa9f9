"""Access lists: which source addresses may connect at all, and which public keys may
listen (and accept) or connect (``[access]`` in the configuration).

Deny wins over allow; an empty allow list admits everyone, a non-empty one only what it
lists. Addresses are checked when a connection is accepted, before any handshake work;
keys when the client asks to listen, accept or connect (its key is known only once its
handshake is done). A reload closes the open connections its lists refuse and the old ones
admitted (relay/policy.py): an address newly denied, a listener's (or accepting side's) key
newly refused by the listen lists, a connecting side's by the connect lists.
"""

from __future__ import annotations

import ipaddress

from ..config import Access, KeyList
from ..errors import CloseReason

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _admits(keys: KeyList, deny: KeyList, key: bytes) -> bool:
    if key in deny.keys:
        return False
    return not keys.entries or key in keys.keys


class AccessControl:
    """The ``[access]`` lists of the running configuration."""

    def __init__(self, access: Access | None = None) -> None:
        self.access = Access()
        self._allow: tuple[Network, ...] = ()
        self._deny: tuple[Network, ...] = ()
        self.apply_config(access if access is not None else Access())

    def apply_config(self, access: Access) -> None:
        """New lists (at start and on reload): they apply to what is asked from now on."""
        self.access = access
        self._allow = _networks(access.ip_allow)
        self._deny = _networks(access.ip_deny)

    @property
    def checks_addresses(self) -> bool:
        return bool(self._allow or self._deny)

    def ip_allowed(self, ip: str) -> bool:
        """Whether a connection from ``ip`` may be served at all."""
        if not (self._allow or self._deny):
            return True
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return not self._allow
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self._deny):
            return False
        return not self._allow or any(address in network for network in self._allow)

    def refuse_request(self, kind: str, key: bytes) -> CloseReason | None:
        """Why a client with ``key`` may not ``listen``, ``accept`` or ``connect`` (None if
        it may). The accepting side of a tunnel is the listener's: the listen lists apply."""
        access = self.access
        if kind == "connect":
            if not _admits(access.connect_allow, access.connect_deny, key):
                return CloseReason.CONNECT_DENIED
        elif not _admits(access.listen_allow, access.listen_deny, key):
            return CloseReason.LISTEN_DENIED
        return None
