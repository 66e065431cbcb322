"""Faults that come from outside the input, turned into a line a person can act on instead of a traceback:
an interrupt (Ctrl-C is SIGINT, exit 130; SIGTERM, as Kaggle, a batch system or `kill` sends it, exit 143)
and a full disk (errno 28, or the `basic_ios::clear: iostream error` / `file write failed` that torch and
ONNX raise instead), which becomes "no space left on <path>: N MB needed, M MB free" (exit 2) after the
temporaries of this process are removed, so nothing half-written looks complete.

Nothing here knows about models or stages: the stage store and the run call it with paths.
"""

import contextlib
import errno
import os
import shutil
import signal
import sys
from typing import Iterator, Optional, Sequence

from research_errors import UsageError
from research_files import folder_size, own_temporaries, remove_entry

# What libraries that write through C++ streams raise on a full disk, without an errno
DISK_FULL_MESSAGES = ('no space left on device', 'os error 28', 'basic_ios::clear: iostream error', 'file write failed',
                      'disk quota exceeded')
NEARLY_FULL_BYTES = 64 * 2 ** 20   # a stream error counts as a full disk only where less than this is free
MB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# Interrupts
# ---------------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so every `finally` runs (the run
    log is written to the end, stage locks are released) and the stage store keeps what was completed."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated in the main thread (Python's default would end the process at once, with
    nothing written); SIGINT keeps Python's KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, raise_terminated)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def interrupt_line(exc: KeyboardInterrupt) -> str:
    what = 'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C (SIGINT)'
    return (f'interrupted by {what}: the stages completed so far are kept in the stage store and an interrupted '
            'training resumes from its last epoch checkpoint; run the same command again to continue.')


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------

class DiskFull(UsageError):
    """No space left where the run writes; the message names the folder, what is needed and what is free."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and the ones it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str) -> int:
    """Bytes free for this user on the filesystem of `path` (or of its nearest existing parent)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def is_disk_full(exc: BaseException, folders: Sequence[str] = ()) -> bool:
    """Whether `exc` (or what it was raised from) is a full disk: errno 28 / EDQUOT, or a stream error from
    C++ code while one of `folders` has almost nothing free."""
    for error in chain(exc):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if any(message in text for message in DISK_FULL_MESSAGES[:2] + DISK_FULL_MESSAGES[4:]):
            return True
        if any(message in text for message in DISK_FULL_MESSAGES[2:4]):
            return any(free_bytes(folder) < NEARLY_FULL_BYTES for folder in folders) if folders else True
    return False


def disk_full_refusal(path: str, needed: Optional[int], what: str, after: str) -> DiskFull:
    """"no space left on <path>: N MB needed, M MB free", what was being written, what was done about it
    (`needed` None or 0: not known, only that it is more than is free)."""
    free = free_bytes(path) / MB
    amounts = f'{needed / MB:.1f} MB needed, {free:.1f} MB free' if needed else f'more needed than the {free:.1f} MB free'
    return DiskFull(f'no space left on {path}: {amounts} (while writing {what}).{" " + after if after else ""} Free space on that disk, or point the run at a disk with room '
                    '(--cache_dir for the stage store and caches, --output_dir for results and exported models), '
                    'then run the same command again.')


def remove_own_temporaries(folders: Sequence[str]) -> int:
    """Remove what this process was writing aside under `folders` (it can never be renamed into place
    now); returns the bytes they held."""
    freed = 0
    for folder in dict.fromkeys(f for f in folders if f and os.path.isdir(f)):
        for path in own_temporaries(folder):
            if os.path.lexists(path):
                freed += folder_size(path)
                remove_entry(path)
    return freed


def fullest(folders: Sequence[str]) -> str:
    """The folder of `folders` with the least space free (where a write that named no file failed)."""
    existing = [f for f in folders if f]
    return min(existing, key=free_bytes) if existing else os.getcwd()


@contextlib.contextmanager
def faults_reported(folders: Sequence[str]) -> Iterator[None]:
    """Around the work of a run that writes under `folders`: an interrupt prints its one line (while the run
    log still records) and goes on; a full disk removes this process's temporaries there and becomes a
    DiskFull refusal."""
    try:
        yield
    except KeyboardInterrupt as exc:
        with contextlib.suppress(OSError):
            print(interrupt_line(exc), file=sys.stderr)
        exc.logged = True
        raise
    except DiskFull:
        remove_own_temporaries(folders)
        raise
    except UsageError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, folders):
            raise
        written = remove_own_temporaries(folders)
        named = next((e.filename for e in chain(exc) if isinstance(e, OSError) and e.filename), None)
        where = os.path.dirname(os.path.abspath(named)) if named else fullest(folders)
        raise disk_full_refusal(where, written, f"'{named}'" if named else 'the run\'s files',
                                'That much had been written when the disk filled, so at least that much is needed; '
                                'the half-written files were removed and nothing was recorded as complete.' if written else
                                'Nothing was recorded as complete.') from exc


def fault_exit_code(exc: BaseException, folders: Sequence[str] = ()) -> Optional[int]:
    """The exit code of a run that ended with `exc`, after printing its message when the run log has not
    (a refusal: 2, Ctrl-C: 130, SIGTERM: 143); None for anything else (a bug: its traceback is kept)."""
    for error in chain(exc):
        if isinstance(error, (UsageError, KeyboardInterrupt)):
            if not any(getattr(e, 'logged', False) for e in chain(exc)):
                print(interrupt_line(error) if isinstance(error, KeyboardInterrupt) else f'error: {error}',
                      file=sys.stderr)
            return interrupt_exit_code(error) if isinstance(error, KeyboardInterrupt) else error.exit_code
    if is_disk_full(exc, folders):
        where = next((e.filename for e in chain(exc) if isinstance(e, OSError) and e.filename), None) or fullest(folders)
        print(f'error: {disk_full_refusal(where, None, "the run log or results", "")}', file=sys.stderr)
        return 2
    return None


def stage_space_estimate(written: int, parent_dir: Optional[str]) -> int:
    """What storing a stage needs, about: what had been written, or when more, four times the weights of the
    model it starts from (its own weights, and a training checkpoint's weights and the optimizer's two
    moments per weight)."""
    weights = 0
    if parent_dir and os.path.isdir(parent_dir):
        weights = sum(os.path.getsize(os.path.join(parent_dir, n)) for n in os.listdir(parent_dir)
                      if n.endswith(('.safetensors', '.bin', '.onnx', '.pt')) and os.path.isfile(os.path.join(parent_dir, n)))
    return max(written, 4 * weights)
