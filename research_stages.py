"""The stage store: every distinct stage of any run, kept on disk under `<cache_dir>/stages/` and keyed by
a hash of what produces it (its kind, its settings, its parent's key, the data it was trained on).

Any pipeline, ablation or later run that needs the same stage reuses it; a changed setting re-runs only
the stages downstream of the change; an interrupted run resumes, because a stage counts as stored only
once its completion record is written. This module knows nothing of models or techniques: a stage is
produced by a callable that writes into a folder and returns its metadata.

A store you can trust:
- the completion record (`STAGE_COMPLETE`, JSON) holds the sha256 of every file of the stage, written when
  it completes; a stage is verified before each reuse, and one that fails (a file changed, truncated or
  missing) is discarded with one line saying which file, and rebuilt;
- one lock per stage (`.locks/<kind>-<key>.lock`, a `filelock` lock holding the owner's pid and host): a run that
  needs a stage another run is producing waits for it and then reuses it; the kernel releases the lock of
  a process that dies, and a lock whose recorded owner is a dead process of this host is taken over;
- a stage folder without a completion record and without a live lock is the leftover of an interrupted
  run, and is removed when the store opens; only its `work/` survives when it holds checkpoints the step can
  resume from (the `resumable` test the run gives the store), so an interrupted training resumes;
- a full disk while a stage is written empties its folder (no completion record; only the newest whole
  checkpoint stays) and refuses the run saying what the stage needs and what is free (research_faults).

Quality and latency are never taken from the store: every stage is loaded back from disk and evaluated in
the current run, so speed-ups compare measurements taken side by side (research_eval keeps only what depends
on a stage's verified files and this machine alone: its zipped size and peak memory).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from filelock import FileLock, Timeout
from transformers import set_seed

from research_errors import UsageError
from research_faults import disk_full_refusal, is_disk_full, stage_space_estimate
from research_files import (checksum_problems, copy_file_unshared, folder_checksums, folder_size, lock_holders,
                            owner_is_dead, owner_record, remove_abandoned_temporaries, remove_entry, unrecorded_entries,
                            write_json_atomically)

COMPLETE_MARKER = 'STAGE_COMPLETE'
STAGE_FORMAT = 4  # bump when what a stored stage holds or how it is keyed changes, so older stores are not misread
META_FILE = 'stage_meta.json'
WORK_DIR = 'work'  # scratch space of a stage being produced (Trainer checkpoints), removed on completion
LOCK_FOLDER = '.locks'   # <root>/.locks/<kind>-<key>.lock: beside, never inside, the stage folders
STORE_FOLDER = 'stages'   # the store's folder inside --cache_dir
STAGE_FOLDER = re.compile(r'^(?P<kind>[a-z_]+)-(?P<key>[0-9a-f]{16})$')


@dataclass
class StageNode:
    kind: str
    key: str
    path: str
    meta: Dict = field(default_factory=dict)
    reused: bool = False


def stage_key(kind: str, parent_key: str, data_key: str, settings: Dict) -> str:
    """The identity of a stage: what it is, what it was made from, on which data, with which settings."""
    payload = {'format': STAGE_FORMAT, 'kind': kind, 'parent': parent_key, 'data': data_key, 'settings': settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def release_use(path: str) -> None:
    fd = _uses.pop(path, None)
    if fd is not None:
        os.close(fd)


def release_stage_uses() -> None:
    """Give up every stage this process uses (at the end of a run; a process that ends gives them up anyway)."""
    for path in list(_uses):
        release_use(path)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class StageStore:
    """Folders `<root>/<kind>-<key>/`; a folder counts only once its completion record is written and its files
    match the checksums in it. Within one run each key is produced or loaded once (`nodes`), and every use is
    logged (`events`)."""

    def __init__(self, root: str, reuse: bool = True, resumable: Optional[Callable[[str], object]] = None):
        self.root = root
        self.reuse = reuse
        # resumable(work folder) -> true when an interrupted attempt left checkpoints there that the step can
        # resume from (the run passes the Trainer's test); such a `work/` survives the cleanup of its stage folder
        self.resumable = resumable
        self.nodes: Dict[str, StageNode] = {}
        self.events: List[Dict] = []
        self.visited, self.planned = 0, 0

    @classmethod
    def in_cache_dir(cls, cache_dir: str, reuse: bool = True, resumable: Optional[Callable[[str], object]] = None) -> 'StageStore':
        return cls(os.path.join(cache_dir, STORE_FOLDER), reuse, resumable)

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, f'{kind}-{key}')

    def lock(self, kind: str, key: str) -> StageLock:
        """The stage's lock (its file is created on first use and left in place: a few bytes)."""
        os.makedirs(os.path.join(self.root, LOCK_FOLDER), exist_ok=True)
        return StageLock(os.path.join(self.root, LOCK_FOLDER, f'{kind}-{key}.lock'), f'{kind}-{key}')

    def use_lock(self, kind: str, key: str) -> str:
        os.makedirs(os.path.join(self.root, LOCK_FOLDER), exist_ok=True)
        return os.path.join(self.root, LOCK_FOLDER, f'{kind}-{key}.use')

    @contextlib.contextmanager
    def sole_user(self, kind: str, key: str) -> Iterator[None]:
        """While a stage folder is removed and produced again (call with its stage lock held): no other live run
        uses it (waiting until none does); afterwards this run uses the new stage (shared)."""
        path = self.use_lock(kind, key)
        fd = take_use_exclusively(path, f'{kind}-{key}')
        try:
            yield
            fcntl.flock(fd, fcntl.LOCK_SH)   # not atomic, but no other run can take it: we hold the stage lock
            _uses[path], fd = fd, None
        finally:
            if fd is not None:
                os.close(fd)

    @contextlib.contextmanager
    def locked(self, kind: str, key: str) -> Iterator[None]:
        """Hold the stage's lock (waiting while another run holds it)."""
        lock = self.lock(kind, key)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- reading ------------------------------------------------------------------------------

    def completion_record(self, kind: str, key: str) -> Optional[Dict]:
        """The stage's completion record; None when it is not stored (no record); {} when unreadable."""
        marker = os.path.join(self.path(kind, key), COMPLETE_MARKER)
        if not os.path.isfile(marker):
            return None
        try:
            with open(marker, encoding='utf-8') as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def problem(self, kind: str, key: str) -> Optional[str]:
        """Why the stored stage cannot be trusted (None when it can): its record is unreadable or has no
        checksums, it names another stage (its kind and key must be this folder's, the requested ones), a file of
        the folder is not in it (every file must be, or the unlisted one would go unchecked), or a file differs
        from its checksum."""
        record = self.completion_record(kind, key)
        if not record or not isinstance(record.get('files'), dict) or META_FILE not in record['files']:
            return 'its completion record is unreadable or has no checksums (written by an older version?)'
        if (record.get('kind'), record.get('key')) != (kind, key):
            return (f"its completion record belongs to stage {record.get('kind')}-{record.get('key')}, not to this "
                    'folder (copied from another stage?)')
        unlisted = unrecorded_entries(self.path(kind, key), record['files'], exclude=(COMPLETE_MARKER,))
        if unlisted:
            return (f'{unlisted[0]} is not in its completion record' + (f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1
                                                                      else '') + ', so its files cannot all be checked')
        problems = checksum_problems(self.path(kind, key), record['files'])
        return problems[0] + (f' (and {len(problems) - 1} more)' if len(problems) > 1 else '') if problems else None

    def load(self, kind: str, key: str) -> Optional[StageNode]:
        """The stored stage, verified against its checksums; for a stage that fails, one line says why and None
        is returned, so it is rebuilt (begin() removes it). Call with the stage's lock held."""
        if self.completion_record(kind, key) is None:
            return None
        path = self.path(kind, key)
        problem = self.problem(kind, key)
        if problem is None:
            try:
                with open(os.path.join(path, META_FILE), encoding='utf-8') as fh:
                    meta = json.load(fh)
            except (OSError, ValueError) as exc:
                problem = f'{META_FILE} is unreadable ({type(exc).__name__})'
        if problem is not None:
            print(f'[store] stage {kind}-{key}: {problem}: rebuilding')
            return None             # removed by begin(), once no other live run uses it
        os.utime(os.path.join(path, COMPLETE_MARKER))      # last use, for --cache_report and pruning
        return StageNode(kind, key, path, meta, reused=True)

    # -- writing ------------------------------------------------------------------------------

    def keeps_work(self, path: str) -> bool:
        """Whether the half-written stage folder `path` holds checkpoints to resume from (kept unless
        --no_reuse_stages, which starts every stage afresh)."""
        work = os.path.join(path, WORK_DIR)
        return bool(self.reuse and self.resumable is not None and os.path.isdir(path) and not os.path.islink(path)
                    and os.path.isdir(work) and not os.path.islink(work) and self.resumable(work))

    def clear_all_but_work(self, path: str) -> None:
        for name in os.listdir(path):
            if name != WORK_DIR:
                remove_entry(os.path.join(path, name))

    def begin(self, kind: str, key: str) -> str:
        """An empty folder for a stage about to be produced (call with its lock held: what is there is the
        leftover of an interrupted attempt, or a stage that failed its checks). The checkpoints an interrupted
        attempt left in `work/` stay, so the step resumes from them."""
        path = self.path(kind, key)
        if self.completion_record(kind, key) is None and self.keeps_work(path):
            print(f'[store] stage {kind}-{key}: an interrupted attempt left Trainer checkpoints in {WORK_DIR}/: '
                  'resuming from them')
            self.clear_all_but_work(path)
            return path
        if os.path.lexists(path):
            if os.path.isdir(path) and os.listdir(path) and self.completion_record(kind, key) is None:
                print(f'[store] stage {kind}-{key}: discarding the half-written folder of an interrupted attempt')
            remove_entry(path)
        os.makedirs(path)
        return path

    def complete(self, kind: str, key: str, meta: Dict, identity: Optional[Dict] = None,
                 seconds: Optional[float] = None) -> StageNode:
        """Remove the scratch space and any Trainer checkpoint, write the metadata, then the completion record
        with the sha256 of every file (last, and atomically: only now does the stage count as stored)."""
        path = self.path(kind, key)
        for root, dirs, _ in os.walk(path):
            for name in list(dirs):
                if name == WORK_DIR or name.startswith('checkpoint-'):
                    remove_entry(os.path.join(root, name))
                    dirs.remove(name)
        with open(os.path.join(path, META_FILE), 'w', encoding='utf-8') as fh:
            json.dump(meta, fh, indent=2, default=str)
        record = {'format': STAGE_FORMAT, 'kind': kind, 'key': key, 'completed': time.time(), 'seconds': seconds,
                  **owner_record(), 'settings': identity or {}, 'files': folder_checksums(path, exclude=(COMPLETE_MARKER,))}
        write_json_atomically(os.path.join(path, COMPLETE_MARKER), record, indent=1, ensure_ascii=True)
        return StageNode(kind, key, path, meta, reused=False)

    @contextlib.contextmanager
    def disk_full_refused(self, kind: str, key: str, made_from: Optional[str]) -> Iterator[None]:
        """A full disk while the stage is written: nothing of it may look complete, so its files go, except
        the newest whole Trainer checkpoint (the next attempt resumes from it), and the run is refused with
        what the stage needs and what is free."""
        path = self.path(kind, key)
        try:
            yield
        except Exception as exc:
            if isinstance(exc, UsageError) or not is_disk_full(exc, [path]):
                raise
            written = folder_size(path)
            kept = self.discard_all_but_resumable(path)
            raise disk_full_refusal(path, stage_space_estimate(written, made_from), f'stage {kind}-{key}',
                                    'About that much is needed to store the stage; its half-written files were removed'
                                    + (f' (the whole checkpoint {kept} is kept, to resume from)' if kept else '')
                                    + ' and nothing was recorded as complete.') from exc

    def discard_all_but_resumable(self, path: str) -> Optional[str]:
        """Empty a stage folder that could not be written, keeping only the checkpoint `resumable` names in its
        `work/` (a half-written checkpoint is never it); returns that checkpoint's name, or None."""
        work = os.path.join(path, WORK_DIR)
        keep = self.resumable(work) if self.resumable and os.path.isdir(work) and not os.path.islink(work) else None
        keep = os.path.basename(keep) if isinstance(keep, str) and os.path.dirname(os.path.abspath(keep)) == os.path.abspath(work) else None
        self.clear_all_but_work(path)
        if keep is None:
            remove_entry(work)
            return None
        for name in os.listdir(work):
            if name != keep:
                remove_entry(os.path.join(work, name))
        return keep

    def plan(self, keys: Iterable[str]) -> None:
        """How many distinct stages the run needs (for the progress display)."""
        self.planned = len(set(keys))
        self.visited = 0

    def get_or_run(self, kind: str, key: str, produce: Callable[[str], Dict], seed: int, where: str = '',
                   identity: Optional[Dict] = None, made_from: Optional[str] = None) -> StageNode:
        """The stored stage `kind-key`, produced by `produce(folder) -> meta` (with the seed set, so its
        randomness never depends on what ran before it) when it is not stored yet. Under the stage's lock: a
        run that needs a stage another run is producing waits, then reuses it. `identity` (the settings that
        made the key) is recorded for --cache_report; `made_from` (the folder of the model it starts from) sizes
        what a full disk needs."""
        if key in self.nodes:
            return self.nodes[key]
        self.visited += 1
        with self.locked(kind, key):
            node = self.load(kind, key) if self.reuse else None
            print(f'\n[plan] stage {self.visited} of {self.planned} distinct{where}: {kind} ({key}) - '
                  + ('reusing the stored stage' if node else 'running'))
            if node is None:
                with self.sole_user(kind, key):   # never removes a stage another live run uses
                    set_seed(seed)
                    started = time.time()
                    folder = self.begin(kind, key)
                    with self.disk_full_refused(kind, key, made_from):
                        node = self.complete(kind, key, produce(folder), identity, time.time() - started)
            hold_use(self.use_lock(kind, key))   # used by this run until it ends: never removed under it
        self.events.append({'kind': kind, 'key': key, 'reused': node.reused})
        self.nodes[key] = node
        return node

    # -- disk hygiene -------------------------------------------------------------------------

    def stage_folders(self) -> List[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if STAGE_FOLDER.match(n) and os.path.isdir(os.path.join(self.root, n)))
        except OSError:
            return []

    def remove_abandoned(self) -> List[str]:
        """Remove the half-written stage folders of runs that are gone (no completion record, no live lock) and
        the temporaries dead processes left; returns what was removed."""
        removed = []
        for name in self.stage_folders():
            kind, key = STAGE_FOLDER.match(name).group('kind', 'key')
            if self.completion_record(kind, key) is not None:
                continue
            lock = self.lock(kind, key)
            if not lock.try_acquire():          # being produced by a live run
                continue
            try:
                if self.completion_record(kind, key) is None and self.keeps_work(self.path(kind, key)):
                    self.clear_all_but_work(self.path(kind, key))
                    print(f'[store] kept the Trainer checkpoints ({WORK_DIR}/) of the half-written stage {name} left by '
                          'an interrupted run: the stage resumes from them when a run needs it')
                elif self.completion_record(kind, key) is None:
                    remove_entry(self.path(kind, key))
                    removed.append(name)
                    print(f'[store] removed the half-written stage {name} left by an interrupted run')
            finally:
                lock.release()
        return removed + remove_abandoned_temporaries(self.root)

    def stored_stages(self) -> List[Dict]:
        """What the store holds: per stage folder its kind, key, size, dates, recorded settings and state
        ('stored', 'being produced' when a live run holds its lock, 'half-written' otherwise)."""
        rows = []
        for name in self.stage_folders():
            kind, key = STAGE_FOLDER.match(name).group('kind', 'key')
            path = self.path(kind, key)
            record = self.completion_record(kind, key)
            owner = read_lock_owner(os.path.join(self.root, LOCK_FOLDER, f'{name}.lock'))
            if record is not None:
                state = 'stored'
            elif owner and not owner_is_dead(owner):
                state = f'being produced by {describe_owner(owner)}'
            elif self.keeps_work(path):
                state = f'half-written, resumable from its {WORK_DIR}/ checkpoints'
            else:
                state = 'half-written'
            marker = os.path.join(path, COMPLETE_MARKER)
            rows.append({'kind': kind, 'key': key, 'path': path, 'bytes': folder_size(path), 'state': state,
                         'stored': (record or {}).get('completed') or (os.path.getmtime(path) if record is None else None),
                         'last_used': os.path.getmtime(marker) if record is not None else None,
                         'settings': (record or {}).get('settings') or {}})
        return rows

    def remove_unused(self, older_than_days: float) -> List[Dict]:
        """Remove the stored stages not used for `older_than_days` days (0: every stage no run is using), each
        under its lock so a stage in use is never removed; returns the removed rows."""
        cutoff = time.time() - older_than_days * 86400
        removed = []
        for row in self.stored_stages():
            if row['state'] != 'stored' or (row['last_used'] or 0) > cutoff:
                continue
            lock = self.lock(row['kind'], row['key'])
            if not lock.try_acquire():
                continue
            try:
                use = take_use_exclusively(self.use_lock(row['kind'], row['key']), f"{row['kind']}-{row['key']}",
                                           wait=False)
                if use is not None:              # no live run uses it
                    remove_entry(row['path'])
                    removed.append(row)
                    os.close(use)
            finally:
                lock.release()
        return removed


def copy_stage(node: StageNode, target: str) -> str:
    """Copy a stored stage's model files into the (new or empty) folder `target` (its completion record, metadata and card
    stay in the store). The copies never share an inode with the store (a copy-on-write clone where the
    filesystem supports it, else a plain copy), so writing to an exported file cannot change the store.
    Returns 'reflink' or 'copy'."""
    how = set()

    def copy(source, destination):
        how.add(copy_file_unshared(source, destination))
        return destination
    try:
        shutil.copytree(node.path, target, copy_function=copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(COMPLETE_MARKER, META_FILE, 'README.md', WORK_DIR))
    except Exception as exc:
        if not is_disk_full(exc, [target]):
            raise
        remove_entry(target)            # a half-copied model folder must not look like an exported model
        raise disk_full_refusal(target, folder_size(node.path), f'the exported model {target}',
                                'The half-copied folder was removed.') from exc
    return 'copy' if 'copy' in how else 'reflink'
