"""What keeps a run's output folder its own: one run per output folder at a time (a lock taken before the
archive, naming its holder), an output folder that never overlaps the stage store in a way that the archive
or the store would touch the other, and path flags that are never empty (an empty path means the working
directory, silently).

The archive itself (what moves to previous_runs/) is research_report's; it ignores the lock file here.
"""

import contextlib
import os
from typing import Dict, Optional, Sequence

from research_errors import UsageError
from research_files import inside, owner_is_dead, remove_entry
from research_stages import StageLock, describe_owner, read_lock_owner

OUTPUT_LOCK = '.research_run.lock'   # <output_dir>/.research_run.lock: held by the run writing there
PATH_FLAGS = ('dataset_path', 'cache_dir', 'output_dir', 'teacher_path', 'teacher_checkpoint', 'student_path')

_held: Dict[str, StageLock] = {}


def output_entries(output_dir: str):
    """The entries of an output folder, without the lock of the run writing there (never archived or counted)."""
    return [name for name in os.listdir(output_dir) if name != OUTPUT_LOCK]


def refuse_empty_paths(args) -> None:
    """A path flag given as '' (or blanks) would mean the working directory: refused."""
    empty = [f'--{name}' for name in PATH_FLAGS if isinstance(getattr(args, name, None), str) and not getattr(args, name).strip()]
    if empty:
        raise UsageError(f'{", ".join(empty)} {"is" if len(empty) == 1 else "are"} empty; an empty path would mean the '
                         'working directory, so the run would write or read there without saying so. Give a real path '
                         '(or leave the flag out for its default).')


def refuse_overlap(output_dir: str, cache_dir: str, tool_outputs: Sequence[str]) -> None:
    """--output_dir and --cache_dir must keep apart: the same folder (the exports land in the store and the
    next run archives the store), an output folder inside the cache folder (the store owns it), or a cache
    folder inside an entry of the output folder that the archive moves (`tool_outputs`). Links resolved."""
    out, cache = os.path.realpath(output_dir), os.path.realpath(cache_dir)
    problem = None
    if out == cache:
        problem = 'are the same folder: the exported models would land in the stage store and the next run would move the store into previous_runs/'
    elif inside(out, cache):
        problem = 'overlap: the output folder lies inside the cache folder, which the stage store owns (its clean-up and --cache_prune_older_than work there)'
    elif inside(cache, out) and os.path.relpath(cache, out).split(os.sep)[0] in tool_outputs:
        first = os.path.relpath(cache, out).split(os.sep)[0]
        problem = (f"overlap: the cache folder lies inside '{first}' of the output folder, which the next run moves to "
                   'previous_runs/ (and --overwrite_output_dir replaces), stage store and all')
    if problem:
        raise UsageError(f"--output_dir '{output_dir}' and --cache_dir '{cache_dir}' {problem}. Choose two separate "
                         'folders, e.g. --output_dir ./compressed_models --cache_dir ./cache.')


def hold_output_folder(output_dir: str) -> None:
    """Take the output folder's lock (creating the folder) before anything in it moves; refused (exit 2) while
    another live run holds it, naming that run. The lock of a run whose recorded owner died is taken over."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, OUTPUT_LOCK)
    lock = StageLock(path, f'output folder {output_dir}')
    if not lock.try_acquire():
        owner = read_lock_owner(path)
        if not owner_is_dead(owner):
            raise UsageError(f"--output_dir '{output_dir}' is in use by the run of {describe_owner(owner)}: two runs "
                             'into one output folder would mix their results, and the second would archive the first\'s '
                             'live log as an earlier run. Wait for that run to end, or choose another --output_dir.')
        print(f'[output] the lock of {describe_owner(owner)} on {output_dir}, which no longer runs, is taken over')
        remove_entry(path)
        lock = StageLock(path, f'output folder {output_dir}')
        if not lock.try_acquire():
            raise UsageError(f"--output_dir '{output_dir}' is locked ({path}) by a process that cannot be named. "
                             'Wait for it to end, or choose another --output_dir.')
    _held[os.path.realpath(output_dir)] = lock


def release_output_folder(output_dir: Optional[str] = None) -> None:
    """Release the output folder lock(s) this process holds (all of them when no folder is given)."""
    for folder in [os.path.realpath(output_dir)] if output_dir else list(_held):
        lock = _held.pop(folder, None)
        if lock is not None:
            # removed while still held, so the folder keeps only what the run wrote (and a refused run leaves a
            # foreign folder as it was); a run starting right now either fails to take it or takes a new file
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock.path)
            lock.lock.release()
