"""A run folder on disk or on an object store: log.txt, TensorBoard events and, on a store, the lease.

RUNDIR is a `shards.storage.Loc`. Checkpoints are `training/checkpoint.py`'s; run.json, fingerprint.json,
sample grids and summary.html are single files, written whole (shards/atomic.py: temp + rename on
disk, one PUT on a store). What cannot be written whole as it happens:

- `log.txt`: on disk appended and flushed line by line, as before. An object cannot be appended to,
  so on a store the log is kept in memory (what the store held at start + this run's lines) and
  rewritten whole, one PUT, just before each checkpoint is committed and at the end. A `kill -9`
  loses the lines after the last upload; the steps after the last committed checkpoint are redone by
  the resumed run and logged again (a step may then appear twice, as on disk: the later line is the
  resumed run's). Readers (training/summary.py) read one file in both cases.
- `tb/`: on disk SummaryWriter writes RUNDIR/tb. For a store it writes into a local temp folder
  whose event files are uploaded (each whole, one PUT; the files are small: scalars and one grid
  per `sample_every`) before each checkpoint and at the end. A resumed run, on any machine, writes new
  event files beside the old ones; its `purge_step` drops the redone steps when they are read.
- Two writers: on disk the run holds RUNDIR/.lock (flock, shards/fingerprint.py). A store has no
  lock that a killed process releases, so a store run takes a lease instead: RUNDIR/lease.json names
  the newest run that started (host, pid, a random token). The newest starter owns the folder: a
  resume after kill -9 or on another machine takes it over at once, and an older writer still
  running finds another owner before its next checkpoint and stops without writing it. The window
  left is one checkpoint's upload; keeping one job per RUNDIR remains the scheduler's job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from shards import atomic
from shards.errors import SigmaError
from shards.storage import Loc
from training.summary import LOG  # log.txt: its line format is summary.py's

TB = "tb"
LEASE = "lease.json"


class RunFolder:
    """Rank 0's writer of RUNDIR's log.txt and TensorBoard folder (`tb_dir` is where SummaryWriter writes)."""

    def __init__(self, run: Loc) -> None:
        self.run = run
        self.on_store = not run.is_local
        if self.on_store:
            log = run / LOG
            self.lines = log.read_text().splitlines() if log.has_file() else []
            self.tb_dir = Path(tempfile.mkdtemp(prefix="sigmaforge-tb-"))
            self.token = take_lease(run)
        else:
            run.mkdir()
            self.log = open(run.local / LOG, "a")
            self.tb_dir = run.local / TB

    def write(self, line: str) -> None:
        if self.on_store:
            self.lines.append(line)
        else:
            self.log.write(line + "\n")
            self.log.flush()

    def check_owner(self) -> None:
        """On a store: SigmaError if a newer run took the lease (this one must not write checkpoints)."""
        if self.on_store:
            check_lease(self.run, self.token)

    def sync(self) -> None:
        """On a store: log.txt rewritten whole and the new or grown event files uploaded."""
        if not self.on_store:
            return
        atomic.write_text(self.run / LOG, "".join(line + "\n" for line in self.lines))
        for f in sorted(self.tb_dir.rglob("*")):
            if f.is_file():
                (self.run / TB / f.relative_to(self.tb_dir).as_posix()).upload(f)

    def close(self) -> None:
        if self.on_store:
            self.sync()
            shutil.rmtree(self.tb_dir, ignore_errors=True)
        else:
            self.log.close()


def take_lease(run: Loc) -> str:
    """Make this process the owner of store folder `run` (RUNDIR/lease.json); returns its token."""
    token = uuid.uuid4().hex
    lease = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    atomic.write_text(run / LEASE, json.dumps(lease) + "\n")
    return token


def check_lease(run: Loc, token: str) -> None:
    try:
        lease = json.loads((run / LEASE).read_text())
    except (OSError, ValueError):
        lease = {}
    if lease.get("token") != token:
        who = f"{lease.get('host')} pid {lease.get('pid')}" if lease else "nobody (lease.json is gone)"
        raise SigmaError(
            f"{run}: another run took this run folder over ({who}, {LEASE}); this one stops without saving"
        )
