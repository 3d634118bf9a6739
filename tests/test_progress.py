"""Progress bars: rate and ETA on a terminal, nothing when stderr is a pipe or a log."""

from __future__ import annotations

import re
import subprocess
import sys

from common import progress
from tests.terminal import RATE_AND_ETA, on_terminal


def test_bar_shows_rate_and_eta_on_a_terminal():
    with on_terminal() as tty:
        with progress.bar(40, "url", "download+score") as bar:
            for _ in range(40):
                bar.update(1)
            progress.say("shard 00000 done", file=sys.stderr)
    assert "download+score: 100%" in tty.text and "40/40" in tty.text, tty.text
    assert re.search(RATE_AND_ETA.format(unit="url"), tty.text), tty.text
    assert "shard 00000 done" in tty.text


def test_bar_is_silent_off_a_terminal_and_when_quiet():
    code = (
        "from common import progress\n"
        "with progress.bar(40, 'url', 'download+score') as b:\n"
        "    b.update(40)\n"
        "progress.say('a log line')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "a log line\n", (r.stdout, r.stderr)
    with on_terminal() as tty:
        with progress.bar(40, "step", "train 512", quiet=True) as bar:
            bar.update(40)
    assert tty.text == ""
