"""One run per output: a lock file holding the owner's pid, so two runs never write the same folder or file.

    with RunLock(out_dir):            # <out_dir>/.run.lock
        train(...)
    with RunLock.for_file(save_path):  # <save_path>.lock beside the file
        ...

A second process asking for a held lock gets a UserError naming the holder's pid and the fix. A lock left
behind by a process that no longer runs (killed, crashed) is taken over with a printed message. The lock is
created with O_EXCL, so two processes racing for it cannot both win. Re-entrant within one process.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from remedi_patches.cli import UserError

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}  # lock path -> depth, for re-entrant use in one process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RunLock:
    def __init__(self, folder: str | Path, name: str = LOCK_NAME, what: Optional[str] = None):
        self.path = Path(folder) / name
        self.what = what or str(folder)

    @classmethod
    def for_file(cls, path: str | Path) -> "RunLock":
        path = Path(path)
        return cls(path.parent, f".{path.name}.lock", what=str(path))

    def acquire(self) -> "RunLock":
        key = self.path.resolve()
        if key in _held:
            _held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "argv": sys.argv})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and (host not in (None, socket.gethostname()) or _alive(pid)):
                    raise UserError(f"{self.what} is in use by another run (pid {pid} on {host}, lock {self.path}); "
                                    "wait for it to finish or pick another output (--out_dir / --save_path)") from None
                print(f"taking over the stale lock {self.path} of pid {pid}, which no longer runs", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            _held[key] = 1
            return self
        raise UserError(f"could not take the lock {self.path}; another run is starting on {self.what}")

    def release(self) -> None:
        key = self.path.resolve()
        if key not in _held:
            return
        _held[key] -= 1
        if _held[key] == 0:
            del _held[key]
            if _read(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
