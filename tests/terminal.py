"""A real pseudo-terminal for tests of what a user sees in a shell (progress bars), and the lines
a user must not see there (NOISE: silenced by common/quiet.py, curation/pipeline.py, encoders/vae.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import struct
import sys
import termios
import threading

# tqdm's "[elapsed<remaining, 12.3url/s" (or " 2.50s/url" below one per second)
RATE_AND_ETA = r"\[(\d+:)?\d\d:\d\d<(\d+:)?\d\d:\d\d, +\d+(\.\d+)?({unit}/s|s/{unit})"
# Ray's and diffusers' lines that are not the user's concern (issue 15), as they appeared in `make demo`
NOISE = (
    "Token authentication is enabled for this Ray cluster",  # every local ray.init
    "has constructor arguments in the object store and max_restarts > 0",  # core_worker.cc, per actor stage
    "' used up to ",  # Ray Data's issue detector: "Operator 'MapBatches(measure_rows)' used up to 429.4MiB ..."
    "pip install accelerate",  # diffusers, on each VAE load
    "Progress bars disabled",
)  # Ray Data, on each dataset: we turn them off ourselves


def noise(text: str) -> list[str]:
    """The lines of `text` a user should not see (NOISE)."""
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


class Terminal:
    """A pseudo-terminal with a window size, as a user's shell has; `slave` is the fd a program writes
    to, `text` is everything it showed."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer's end is closed
                return
            if not data:
                return
            self.chunks.append(data)

    def close(self) -> None:
        os.close(self.slave)
        self.reader.join(timeout=10)
        os.close(self.master)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


@contextlib.contextmanager
def terminal():
    """`with terminal() as tty: subprocess.run(..., stderr=tty.slave)`; read `tty.text` after the block."""
    tty = Terminal()
    try:
        yield tty
    finally:
        tty.close()


@contextlib.contextmanager
def on_terminal():
    """Run the block with this process's sys.stderr on a real TTY; read `tty.text` after the block."""
    with terminal() as tty:
        saved, sys.stderr = sys.stderr, open(tty.slave, "w", buffering=1, closefd=False)
        try:
            yield tty
        finally:
            sys.stderr.close()
            sys.stderr = saved
