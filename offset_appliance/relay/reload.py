"""A checked reload: the new configuration read whole or not at all, what a running relay
cannot change kept as it runs, and one log line for each setting that changed."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from ..config import KEY_LISTS, Config, config_values

log = logging.getLogger("strelay")

# The settings a running relay cannot change: they take a restart.
RESTART_ONLY = ("listen", "identity_file", "metrics")
# A changed value longer than this is shortened in the reload's log line.
CHANGE_SHOWN = 200


class ReloadFailed(Exception):
    """The configuration could not be read again; the running one stays (one line)."""


def read_again(running: Config, read: Callable[[], Config]) -> tuple[Config, list[str]]:
    """The configuration ``read`` gives, with the restart-only settings of ``running``, and
    the lines that say what changed. ``ReloadFailed`` says why nothing is to be applied."""
    try:
        config = read()
    except Exception as exc:  # any failure keeps the running config
        reason = str(exc) or type(exc).__name__
        raise ReloadFailed(" ".join(reason.split())) from None  # one line, whatever it held
    fixed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(running, name)]
    if fixed:
        # Said on every reload while the file and the running relay differ, and the
        # relay's config keeps saying what is running.
        log.warning(
            "reload: %s changed in the configuration; this takes a restart, the relay "
            "keeps running with the old value",
            ", ".join(fixed),
        )
        config = dataclasses.replace(
            config, **{name: getattr(running, name) for name in RESTART_ONLY}
        )
    return config, changes(running, config)


def say_changes(lines: list[str], old_level: int, done: list[str] | None = None) -> None:
    """Log what a reload changed, once it is in force, and what it did (``done``: the
    connections the new access lists closed): at the more verbose of the old and the new
    log level (a reload to warning still says what it changed, and so does the reload
    back)."""
    root = logging.getLogger()
    new_level = root.level
    root.setLevel(min(old_level, new_level))
    for line in [*lines, *(done or ())]:
        log.info("reload: %s", line)
    log.info(
        "configuration reloaded: %s",
        f"{len(lines)} setting{'s' if len(lines) != 1 else ''} changed"
        if lines
        else "nothing changed",
    )
    root.setLevel(new_level)


def changes(old: Config, new: Config) -> list[str]:
    """``"limits.max_connections 20000 -> 100"`` for every setting that differs, and
    ``"access.listen_allow: /etc/offset-relay/my-nodes.keys: 1 -> 2 keys"`` for every key
    file named before and after whose keys changed (the setting's text did not)."""
    before, after = config_values(old), config_values(new)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was != now:
            lines.append(f"{key} {_shown(was)} -> {_shown(now)}")
    for name in KEY_LISTS:
        was_files = dict(getattr(old.access, name).files)
        for path, keys in getattr(new.access, name).files:
            had = was_files.get(path)
            if had is not None and had != keys:
                lines.append(f"access.{name}: {path}: {_file_change(had, keys)}")
    return lines


def _file_change(had: frozenset[bytes], has: frozenset[bytes]) -> str:
    """``"1 -> 2 keys"``, and which changed when the count alone does not say."""
    text = f"{len(had)} -> {len(has)} keys"
    added, removed = len(has - had), len(had - has)
    if added and removed:
        text += f" ({added} added, {removed} removed)"
    return text


def _shown(value: object) -> str:
    if value is None:
        text = "(unset)"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str) and value and not any(c.isspace() for c in value):
        text = value
    elif isinstance(value, (str, list)):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= CHANGE_SHOWN else text[: CHANGE_SHOWN - 3] + "..."
