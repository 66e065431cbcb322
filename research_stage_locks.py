"""The store's locks: one exclusive lock per stage while it is verified or produced (`StageLock`, a
`filelock` lock whose file records the owner's pid, host and time, taken over when that owner died), and
the use-locks (flock, shared for as long as a run uses a stage, exclusive to remove it). Knows no domain
module: the store (research_stages) uses it, and research_output_guard reads the owner records.
"""

import contextlib
import fcntl
import json
import os
import time
from typing import Dict, Optional

from filelock import FileLock, Timeout

from research_files import lock_holders, owner_is_dead, owner_record


# ---------------------------------------------------------------------------------------------
# One lock per stage
# ---------------------------------------------------------------------------------------------

def read_lock_owner(path: str) -> Optional[Dict]:
    """The owner record a lock file holds ({pid, host, since, stage}), or None (free, or unreadable)."""
    try:
        with open(path, encoding='utf-8') as fh:
            record = json.loads(fh.read() or 'null')
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_owner(record: Optional[Dict]) -> str:
    if not record:
        return 'another run'
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.get('since', 0)))
    return f"pid {record.get('pid')} on host {record.get('host')} (since {since})"


class StageLock:
    """An exclusive lock on one stage, held while the stage is verified or produced. `filelock.FileLock`
    (flock) excludes the other processes; its file records the owner (pid, host, time) for the messages of
    waiting runs and for taking over a lock whose owner died."""

    poll_seconds = 2.0        # how often a waiting run looks at the lock again
    takeover_checks = 2       # consecutive looks that must find a dead owner before the lock is taken over

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self.lock = FileLock(path)

    def try_acquire(self) -> bool:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            return False
        self._write_owner({**owner_record(), 'since': time.time(), 'stage': self.label})
        return True

    def acquire(self) -> None:
        if self.try_acquire():
            return
        print(f'[store] stage {self.label} is being produced by {describe_owner(read_lock_owner(self.path))}: '
              'waiting for it')
        dead_looks = 0
        while True:
            try:
                self.lock.acquire(timeout=self.poll_seconds)
                break
            except Timeout:
                owner = read_lock_owner(self.path)
                dead_looks = dead_looks + 1 if owner_is_dead(owner) else 0
                if dead_looks >= self.takeover_checks:
                    # The recorded owner is gone but its lock is still held (e.g. by a child it forked, or a lock
                    # without flock support): take it over on a fresh lock file.
                    print(f'[store] stage {self.label}: the lock of {describe_owner(owner)}, which no longer runs, '
                          'is taken over')
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                    self.lock = FileLock(self.path)
                    dead_looks = 0
        self._write_owner({**owner_record(), 'since': time.time(), 'stage': self.label})

    def release(self) -> None:
        try:
            self._write_owner(None)
        finally:
            self.lock.release()

    def _write_owner(self, record: Optional[Dict]) -> None:
        with open(self.path, 'r+' if os.path.exists(self.path) else 'w', encoding='utf-8') as fh:
            fh.truncate(0)
            if record:
                fh.write(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# Stages in use: a shared lock for as long as a run uses a stage, an exclusive one to remove it
# ---------------------------------------------------------------------------------------------

_uses: Dict[str, int] = {}   # use-lock path -> the descriptor this process holds it (shared) through


def hold_use(path: str) -> None:
    """Hold the use-lock `path` shared (every run that uses a stage does, until it ends): the stage is not
    removed while it is held, by a rebuild (--no_reuse_stages, a failed check) or by --cache_prune_older_than."""
    if path not in _uses:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _uses[path] = fd


def take_use_exclusively(path: str, label: str, wait: bool = True) -> Optional[int]:
    """The use-lock `path` held exclusively (this process's own shared hold given up first): no other live run
    uses the stage. Waits, saying who uses it, unless `wait` is false (then None when it is in use)."""
    release_use(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
    holders = ', '.join(f'pid {pid}' for pid in lock_holders(path)) or 'another run'
    print(f'[store] stage {label} is in use by {holders} (evaluating or exporting it): waiting for it to finish '
          'before the stage is removed and rebuilt')
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def record_use(path: str, fd: int) -> None:
    """Note that this process holds the use-lock `path` (shared) through `fd`, to be given up by release_use."""
    _uses[path] = fd


def release_use(path: str) -> None:
    fd = _uses.pop(path, None)
    if fd is not None:
        os.close(fd)


def release_stage_uses() -> None:
    """Give up every stage this process uses (at the end of a run; a process that ends gives them up anyway)."""
    for path in list(_uses):
        release_use(path)
