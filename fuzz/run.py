"""Coverage-guided fuzzing of one target with atheris.

    python -m fuzz.run TARGET [CORPUS_DIR] [libFuzzer options, e.g. -max_total_time=600]

Run from the repository root. Without a corpus directory a fresh one is seeded from
``SEEDS``. A target raising anything but ``ProtocolError`` stops the run with the input saved
as ``crash-*`` (libFuzzer's behaviour), and the exit status is non-zero.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["offset_appliance", "fuzz"]):
    from fuzz.targets import SEEDS, TARGETS
    from offset_appliance.errors import ProtocolError


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options]")
    name = argv[1]
    target = TARGETS[name]
    args = [argv[0], *argv[2:]]
    if not any(not arg.startswith("-") for arg in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
        for index, seed in enumerate(SEEDS[name]):
            (corpus / f"seed-{index}").write_bytes(seed)
        args.append(str(corpus))

    def test_one_input(data: bytes) -> None:
        try:
            target(data)
        except ProtocolError:
            pass

    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
