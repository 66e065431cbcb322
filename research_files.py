"""Files the tool can trust: sha256 checksums of a folder's files, temporary names that say which process
writes them (so the leftovers of a process that died can be recognised and removed), whether a process is
still running, copies that never share an inode with their source, removal that never follows a symbolic link and never
leaves a given folder, whether a set of entries can be moved (and moving all of them or none), and whether
a file a library wrote was written to its end.

Nothing here knows about models, stages or runs; the stage store, the caches and the output folder use it.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import zipfile
from typing import IO, Dict, Iterator, List, Optional, Tuple

TEMPORARY_TAG = '.tmp-'   # <final name>.tmp-<host>-<pid>: written aside, then renamed into place
_TEMPORARY = re.compile(r'^(?P<final>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$')
FICLONE = 0x40049409      # Linux ioctl: copy-on-write clone of a whole file (btrfs, XFS with reflink, bcachefs)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

def this_host() -> str:
    return socket.gethostname()


def process_is_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        return True
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as fh:
            return fh.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


def owner_record() -> Dict:
    """Who this process is, as written into lock files and completion records."""
    return {'pid': os.getpid(), 'host': this_host()}


def owner_is_dead(record: Optional[Dict]) -> bool:
    """True only when `record` names a process on this host that no longer runs (another host's process
    cannot be checked, so it is never declared dead)."""
    if not record or record.get('host') != this_host():
        return False
    try:
        return not process_is_alive(int(record.get('pid', 0)))
    except (TypeError, ValueError):
        return False


def lock_holders(path: str) -> List[int]:
    """The processes of this host other than this one that hold a flock on `path` (from /proc/locks; empty
    where the platform cannot say)."""
    try:
        stat = os.stat(path)
        with open('/proc/locks', encoding='ascii') as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    device = f'{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}'
    pids = set()
    for line in lines:
        fields = line.split()
        if '->' in fields:         # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == device and fields[4].isdigit():
            pids.add(int(fields[4]))
    return sorted(pids - {os.getpid()})


# ---------------------------------------------------------------------------------------------
# Writing aside, then renaming
# ---------------------------------------------------------------------------------------------

def temporary_path(path: str) -> str:
    """Where to write `path` before renaming it into place: the name says which host and process writes it."""
    return f'{path}{TEMPORARY_TAG}{this_host()}-{os.getpid()}'


@contextlib.contextmanager
def written_aside(path: str) -> Iterator[str]:
    """The one way the tool writes a file or folder that must be complete or absent: the block writes the
    temporary name this yields (temporary_path: the only temporary scheme, so cleanup knows one pattern),
    which is renamed onto `path` when the block ends; if the block or the rename fails, it is removed."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            remove_entry(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', encoding: Optional[str] = 'utf-8') -> Iterator[IO]:
    """open(path, mode) written aside and renamed into place on close (see written_aside); never writes
    through an existing file at `path`, which may share its blocks with a copy."""
    with written_aside(path) as tmp, open(tmp, mode, encoding=None if 'b' in mode else encoding) as fh:
        yield fh


def write_json_atomically(path: str, payload, **dump_options) -> None:
    """Write aside, then rename: an interrupted run never leaves a complete-looking, half-written file."""
    options = {'indent': 2, 'ensure_ascii': False, 'default': str, **dump_options}
    with atomic_write(path) as fh:
        json.dump(payload, fh, **options)


def abandoned_temporary(name: str) -> bool:
    """Whether `name` is a temporary file or folder of a process on this host that no longer runs."""
    match = _TEMPORARY.match(name)
    return bool(match) and owner_is_dead({'host': match['host'], 'pid': match['pid']})


def remove_abandoned_temporaries(folder: str) -> List[str]:
    """Remove the temporaries that dead processes of this host left in `folder`; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        if abandoned_temporary(name):
            remove_entry(os.path.join(folder, name))
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------

def sha256_of_file(path: str) -> str:
    with open(path, 'rb') as fh:
        return hashlib.file_digest(fh, 'sha256').hexdigest()


def folder_checksums(folder: str, exclude: Tuple[str, ...] = ()) -> Dict[str, Dict]:
    """{relative path: {'sha256', 'bytes'}} of every file under `folder` (symbolic links not followed),
    except the top-level names in `exclude`."""
    sums = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative in exclude or os.path.islink(path):
                continue
            sums[relative] = {'sha256': sha256_of_file(path), 'bytes': os.path.getsize(path)}
    return sums


def checksum_problems(folder: str, recorded: Dict[str, Dict]) -> List[str]:
    """What differs between `folder` and the checksums recorded for it: '<file> is missing' or '<file>
    changed since it was stored (checksum mismatch)'; empty when every recorded file is intact."""
    problems = []
    for relative, expected in sorted(recorded.items()):
        path = os.path.join(folder, relative)
        if not os.path.isfile(path) or os.path.islink(path):
            problems.append(f'{relative} is missing')
        elif os.path.getsize(path) != expected.get('bytes') or sha256_of_file(path) != expected.get('sha256'):
            problems.append(f'{relative} changed since it was stored (checksum mismatch)')
    return problems


def unrecorded_entries(folder: str, recorded: Dict[str, Dict], exclude: Tuple[str, ...] = ()) -> List[str]:
    """What lies under `folder` that `recorded` does not list (a file, or a symbolic link, which a record never
    lists): a record that omits a file would skip that file's check, so such an entry makes the folder
    untrusted. Recorded names that point outside the folder ('..', absolute) are listed too."""
    found = [name for name in recorded if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == '..']
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative not in exclude and relative not in recorded and (os.path.islink(path) or name in files):
                found.append(relative)
    return sorted(found)


def folder_size(path: str) -> int:
    """Bytes of the files under `path` (symbolic links not followed)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                total += os.path.getsize(file)
    return total


# ---------------------------------------------------------------------------------------------
# Copying and removing
# ---------------------------------------------------------------------------------------------

def copy_file_unshared(source: str, target: str) -> str:
    """Copy `source` to `target` so that they never share an inode (writing to one never changes the other):
    a copy-on-write clone (reflink) where the filesystem supports it, else a plain copy. Returns which."""
    if sys.platform.startswith('linux'):
        try:
            import fcntl
            with open(source, 'rb') as src, open(target, 'wb') as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            shutil.copystat(source, target)
            return 'reflink'
        except OSError:
            pass
    shutil.copy2(source, target)
    return 'copy'


def remove_entry(path: str) -> None:
    """Remove a file, a symbolic link (the link only, never what it points to) or a folder tree (whose
    symbolic links are removed as links, never followed)."""
    if os.path.islink(path) or not os.path.isdir(path):
        with_missing_ok(os.remove, path)
    else:
        shutil.rmtree(path)


def with_missing_ok(function, path: str) -> None:
    try:
        function(path)
    except FileNotFoundError:
        pass


def inside(path: str, root: str) -> bool:
    """Whether `path` lies strictly inside `root`, judged on the names (no link resolved)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path != root and os.path.commonpath([path, root]) == root


def fresh_folder_inside(root: str, target: str) -> List[str]:
    """Make `target` (inside `root`) an empty real folder: every folder between `root` and `target` is made
    a real folder (a symbolic link or file in the way is removed itself, never what a link points to), and
    whatever `target` held is removed. Never touches anything outside `root`. Returns the notes worth
    printing (links that were replaced)."""
    if not inside(target, root):
        raise ValueError(f'{target} is not inside {root}')
    notes = []
    current = os.path.abspath(root)
    for part in os.path.relpath(os.path.abspath(target), current).split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            notes.append(f"'{current}' was a symbolic link (to {os.readlink(current)}): the link was replaced by a "
                         'folder; nothing it pointed to was touched')
            os.remove(current)
        elif os.path.exists(current) and (current == os.path.abspath(target) or not os.path.isdir(current)):
            remove_entry(current)
        os.makedirs(current, exist_ok=True)
    return notes


def folder_problem(path: str) -> Optional[str]:
    """Why `path` cannot serve as a folder to write into (None when it can): it is a file or a broken link, a
    file sits where one of its parent folders should be, or nothing can be created there (permissions, a
    read-only filesystem). Probes by creating and removing an empty folder, never by writing a file."""
    if os.path.islink(path) and not os.path.exists(path):
        return f'is a broken symbolic link (to {os.readlink(path)})'
    if os.path.exists(path) and not os.path.isdir(path):
        return 'is a file, not a folder'
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot be created: '{existing}' is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix='.write-test-', dir=existing))
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc} in '{existing}')"
    return None


# ---------------------------------------------------------------------------------------------
# Moving a set of entries: all of them or none
# ---------------------------------------------------------------------------------------------

FS_IOC_GETFLAGS = 0x80086601          # Linux ioctl: the inode flags that `lsattr` shows
FS_IMMUTABLE_FL, FS_APPEND_FL = 0x10, 0x20


def inode_flags(path: str) -> int:
    """The inode flags of a file or folder (0 where the filesystem or the platform cannot say)."""
    if not sys.platform.startswith('linux') or os.path.islink(path):
        return 0
    try:
        import fcntl
        import struct
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_NOFOLLOW', 0))
    except OSError:
        return 0
    try:
        return struct.unpack('i', fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4])[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def locked_by_flags(path: str) -> Optional[str]:
    flags = inode_flags(path)
    if flags & FS_IMMUTABLE_FL:
        return 'is marked immutable (chattr +i)'
    if flags & FS_APPEND_FL:
        return 'is marked append-only (chattr +a)'
    return None


def rename_problem(path: str) -> Optional[str]:
    """Why `path` cannot be renamed to another name in the same folder tree (None when nothing says it
    cannot): it or its folder is immutable or append-only, it is a mount point, or (for other users than
    root) its folder, or the folder itself, cannot be written. Looks, moves nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    problem = locked_by_flags(path)
    if problem:
        return problem
    problem = locked_by_flags(folder)
    if problem:
        return f"lies in '{folder}', which {problem}"
    if not os.path.islink(path) and os.path.isdir(path) and os.stat(path).st_dev != os.stat(folder).st_dev:
        return 'is a mount point (another filesystem is mounted there)'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"lies in '{folder}', which you cannot write to"
    if not os.path.islink(path) and os.path.isdir(path) and not os.access(path, os.W_OK):
        return 'is a folder you cannot write to (moving it changes its parent entry)'
    return None


def move_all_or_none(moves: List[Tuple[str, str]]) -> None:
    """Rename every (source, target); when one fails, the ones already moved are moved back and the error
    is raised (an OSError naming the source): never half the set moved."""
    done = []
    try:
        for source, target in moves:
            try:
                os.rename(source, target)
            except OSError as exc:
                exc.filename = exc.filename or source
                raise
            done.append((source, target))
    except OSError:
        for source, target in reversed(done):
            os.rename(target, source)
        raise


# ---------------------------------------------------------------------------------------------
# Files written to the end
# ---------------------------------------------------------------------------------------------

def own_temporaries(folder: str) -> List[str]:
    """The temporaries this process is writing under `folder` (its whole tree, links not followed)."""
    mine = f'{TEMPORARY_TAG}{this_host()}-{os.getpid()}'
    found = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            if name.endswith(mine):
                found.append(os.path.join(root, name))
        dirs[:] = [d for d in dirs if not d.endswith(mine)]
    return found


def file_is_whole(path: str) -> bool:
    """Whether a file that a library wrote was written to its end, for the formats whose end can be
    checked cheaply: JSON parses, a safetensors file is as long as its header says, a zip (torch.save)
    has its central directory. Other files count as whole."""
    try:
        if path.endswith('.json'):
            with open(path, encoding='utf-8') as fh:
                json.load(fh)
        elif path.endswith('.safetensors'):
            return safetensors_is_whole(path)
        elif zipfile.is_zipfile(path) or path.endswith(('.pt', '.pth')):
            with zipfile.ZipFile(path):      # reads the central directory, written last
                return True
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return True


def safetensors_is_whole(path: str) -> bool:
    """A safetensors file: 8-byte header length, the JSON header, then the data its offsets end at."""
    with open(path, 'rb') as fh:
        head = fh.read(8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, 'little')
        header = json.loads(fh.read(length))
    ends = [entry['data_offsets'][1] for name, entry in header.items() if name != '__metadata__']
    return os.path.getsize(path) >= 8 + length + max(ends, default=0)
