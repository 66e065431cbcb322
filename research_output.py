"""The output folder and what a run prints into it: refuse a foreign non-empty folder, archive an earlier run's
files to previous_runs/<time>/ (never deleting, never touching another name), the names of the files a run
writes there, the run log (stdout and stderr replayed as a terminal shows them) and the progress bars.
"""

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from typing import Sequence

import datasets
import huggingface_hub.utils as hub_utils
from transformers.utils import logging as transformers_logging

from research_compression_config import TOOL_MARKER, TOOL_OUTPUTS
from research_errors import UsageError
from research_files import TEMPORARY_TAG, locked_by_flags, move_all_or_none, rename_problem
from research_output_guard import output_entries

RESULTS_JSON = 'results_final.json'
RESULTS_CSV = 'results_final.csv'
CONFIG_JSON = 'config.json'
RUN_LOG = 'run.log'
STAGE_LOG = 'stage_log.json'


# ---------------------------------------------------------------------------------------------
# Output folder: refuse a foreign non-empty folder, never silently overwrite an earlier run, and never
# move or delete anything but the tool's own files
# ---------------------------------------------------------------------------------------------

ARCHIVE_DIR = 'previous_runs'


def is_tool_output(name: str) -> bool:
    """A top-level name the tool writes, or the temporary of one left by an interrupted write (every file is
    written aside under research_files.temporary_path, the one temporary scheme)."""
    return name.split(TEMPORARY_TAG)[0] in TOOL_OUTPUTS


def holds_earlier_run(output_dir: str) -> bool:
    """Its config.json says this tool wrote it, or everything in it is the tool's (a run interrupted before
    config.json was written, an archive that was interrupted, or only previous_runs/ left)."""
    try:
        with open(os.path.join(output_dir, CONFIG_JSON), encoding='utf-8') as fh:
            if json.load(fh).get('tool') == TOOL_MARKER:
                return True
    except (OSError, ValueError, AttributeError):
        pass
    return all(is_tool_output(n) for n in output_entries(output_dir) if n != ARCHIVE_DIR)


def prepare_output_dir(args) -> None:
    """Create the output folder. A non-empty folder that is not an earlier run of this tool is refused unless
    --overwrite_output_dir. Either way, the entries with the tool's names (TOOL_OUTPUTS, nothing else) are moved
    to previous_runs/<time>/ before the run writes: nothing is deleted or overwritten, no link is followed,
    and every other entry stays where it is."""
    out = args.output_dir
    if os.path.isdir(out) and output_entries(out):
        earlier = holds_earlier_run(out)
        if not earlier and not args.overwrite_output_dir:
            raise UsageError(f"--output_dir '{out}' is not empty and does not hold an earlier run of this tool. "
                             'Choose an empty or new folder, or pass --overwrite_output_dir to write into it anyway (its '
                             f'entries named like the tool\'s outputs, {", ".join(TOOL_OUTPUTS)}, are moved to '
                             f'{ARCHIVE_DIR}/<time>/ first; nothing else in it is touched).')
        ours = sorted(n for n in output_entries(out) if is_tool_output(n))
        if ours:
            refuse_unmovable_entries(out, ours)
            archive = archive_folder(out)
            # config.json last: a move interrupted half-way still leaves a folder recognised as an earlier run
            move_into_archive(out, archive, sorted(ours, key=lambda n: n == CONFIG_JSON))
            kept = len(output_entries(out)) - 1
            print(f'[output] {out} ' + ('held an earlier run' if earlier else "has entries named like this tool's outputs")
                  + f': {", ".join(ours)} moved to {archive}'
                  + (f'; {kept} other entr{"y" if kept == 1 else "ies"} left in place' if kept else ''))
    os.makedirs(out, exist_ok=True)


def refuse_unmovable_entries(out: str, names: Sequence[str]) -> None:
    """Before anything moves: every entry to archive can be renamed, and previous_runs/ can take them."""
    archive_root = os.path.join(out, ARCHIVE_DIR)
    problems = [f"'{os.path.join(out, n)}' {p}" for n in names for p in [rename_problem(os.path.join(out, n))] if p]
    if os.path.lexists(archive_root) and (os.path.islink(archive_root) or not os.path.isdir(archive_root)):
        problems.append(f"'{archive_root}' is not a folder")
    elif os.path.isdir(archive_root) and locked_by_flags(archive_root):
        problems.append(f"'{archive_root}' {locked_by_flags(archive_root)}")
    if problems:
        raise UsageError(f"--output_dir '{out}' holds an earlier run that cannot be moved to {ARCHIVE_DIR}/ ("
                         f"{'; '.join(problems)}), so nothing was moved. Make those entries movable (e.g. chattr -i, "
                         'or unmount), move them away yourself, or choose another --output_dir.')


def move_into_archive(out: str, archive: str, names: Sequence[str]) -> None:
    """All of the entries or none: a rename that fails anyway moves the others back (the archive folder,
    then empty, is removed) and the run is refused naming the entry."""
    made_root = not os.path.lexists(os.path.dirname(archive))
    os.makedirs(archive)
    try:
        move_all_or_none([(os.path.join(out, n), os.path.join(archive, n)) for n in names])
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(archive)
            if made_root:
                os.rmdir(os.path.dirname(archive))
        raise UsageError(f"--output_dir '{out}': moving the earlier run's '{exc.filename}' to {ARCHIVE_DIR}/ failed "
                         f'({exc.strerror or exc}), so the entries already moved were put back and nothing else was '
                         'touched. Make it movable or move it away yourself, or choose another --output_dir.') from exc


def archive_folder(output_dir: str) -> str:
    """previous_runs/<time>/, made unique when two runs start within the same second."""
    base = os.path.join(output_dir, ARCHIVE_DIR, time.strftime('%Y%m%d-%H%M%S'))
    path, n = base, 1
    while os.path.lexists(path):
        path, n = f'{base}-{n}', n + 1
    return path


# What a terminal interprets in a printed stream: escape sequences (CSI: colours, cursor moves, erasing; OSC:
# titles, links; two-byte escapes), carriage returns and newlines.
TERMINAL_CONTROL = re.compile(r'(\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|\r|\n)')


class TerminalLines:
    """Replays printed text as a terminal shows it (carriage returns, cursor up/down, erase line; colours
    dropped) and writes each line to `log` in its final state, once the cursor can no longer come back to it:
    a progress bar redrawn a thousand times is one line, a cleared one none."""

    LIVE_ROWS = 4   # how far up a redraw may reach (nested progress bars move up a row or two)

    def __init__(self, log, durable: bool = False):
        self.log = log
        self.rows, self.redrawn = [''], [False]
        self.row = self.col = 0
        # durable (a log file): every line is on disk as soon as it is printed, so the log of a killed run
        # (kill -9, a time limit) holds all it printed; the rows a redraw may still change are written
        # provisionally after the final ones and rewritten in place
        self.durable, self.provisional = durable, False
        self.committed = log.tell() if durable else 0

    def feed(self, text: str) -> None:
        for piece in TERMINAL_CONTROL.split(text):
            if piece == '\n':
                self.move_to(self.row + 1)
                self.col = 0
            elif piece == '\r':
                self.col = 0
                self.redrawn[self.row] = True
            elif piece.startswith('\x1b'):
                self.escape(piece)
            elif piece:
                line = self.rows[self.row].ljust(self.col)
                self.rows[self.row] = line[:self.col] + piece + line[self.col + len(piece):]
                self.col += len(piece)
        self.commit(self.row - self.LIVE_ROWS)
        if self.durable:
            self.write_live_rows()

    def write_live_rows(self) -> None:
        """The rows still open to redraws, as they stand now, after the final lines (replaced next time)."""
        self.drop_provisional()
        rows = self.rows[:-1] if self.rows[-1] == '' else self.rows
        text = ''.join(line.rstrip() + '\n' for line, redrawn in zip(rows, self.redrawn) if not redrawn or line.strip())
        if text:
            self.log.write(text)
            self.provisional = True
        self.log.flush()

    def drop_provisional(self) -> None:
        if self.provisional:
            self.log.truncate(self.committed)
            self.log.seek(self.committed)
            self.provisional = False

    def move_to(self, row: int) -> None:
        while row >= len(self.rows):
            self.rows.append('')
            self.redrawn.append(False)
        self.row = max(row, 0)

    def escape(self, code: str) -> None:
        """Cursor up (A), down (B), to a column (G) and erase in line (K); anything else (colours) is dropped."""
        if not code.startswith('\x1b[') or code[-1] not in 'ABGK':
            return
        count = int(code[2:-1]) if code[2:-1].isdigit() else None
        if code[-1] in 'AB':
            self.move_to(self.row + (count or 1) * (-1 if code[-1] == 'A' else 1))
        elif code[-1] == 'G':
            self.col = (count or 1) - 1
        else:
            line = self.rows[self.row]
            self.rows[self.row] = {None: line[:self.col], 0: line[:self.col], 1: ' ' * self.col + line[self.col:]}.get(count, '')
        self.redrawn[self.row] = True

    def commit(self, end: int) -> None:
        """Write the rows above `end`; a row that a redraw left blank is no line."""
        end = min(end, len(self.rows))
        if self.durable and end > 0:
            self.drop_provisional()
        for line, redrawn in zip(self.rows[:max(end, 0)], self.redrawn):
            if not redrawn:
                self.log.write(line + '\n')
            elif line.strip():
                self.log.write(line.rstrip() + '\n')
        if end > 0:
            del self.rows[:end], self.redrawn[:end]
            self.row -= end
            if self.durable:
                self.log.flush()
                self.committed = self.log.tell()

    def close(self) -> None:
        """Everything left, except the empty row the cursor waits on after the last newline."""
        if self.rows[-1] == '':
            self.rows.pop()
            self.redrawn.pop()
        if self.durable:
            self.drop_provisional()
        self.commit(len(self.rows))
        self.rows, self.redrawn, self.row, self.col = [''], [False], 0, 0
        self.log.flush()


class TeeToLog:
    """A stream that also feeds what it prints to the run log's terminal replay (stdout and stderr share one,
    as they share a terminal)."""

    def __init__(self, stream, screen: TerminalLines):
        self.stream, self.screen = stream, screen

    def write(self, text):
        self.stream.write(text)
        self.screen.feed(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.screen.log.flush()

    def __getattr__(self, name):   # isatty, encoding, fileno...: the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def captured_output():
    """Tee stdout into a buffer, as a terminal finally shows it (what a run prints before its output folder
    exists, replayed into run.log)."""
    saved, buffer = sys.stdout, io.StringIO()
    screen = TerminalLines(buffer)
    sys.stdout = TeeToLog(sys.stdout, screen)
    try:
        yield buffer
    finally:
        sys.stdout = saved
        screen.close()


def _stream_handlers():
    """Every logging.StreamHandler of every logger (transformers', datasets', ...)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    # 'stream' in vars(h): a handler that holds its stream (the last-resort handler reads sys.stderr each time)
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler) and 'stream' in vars(h)]


def _log_handlers_to(tees) -> list:
    """Point every stream handler that writes to the process's stdout or stderr at the tee of that stream;
    returns (handler, its stream) to restore. A library's handler holds the stream it found when it was made
    (transformers' holds the real stderr), so swapping sys.stderr alone would keep its lines out of run.log."""
    moved = []
    for handler in _stream_handlers():
        for tee, streams in zip(tees, ((sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__))):
            if any(handler.stream is stream for stream in streams):
                moved.append((handler, handler.setStream(tee)))
                break
    return moved


@contextlib.contextmanager
def run_log(path: str, preamble: str = ''):
    """Tee stdout and stderr into `path` (appended, after `preamble`) as a terminal finally shows them,
    libraries' log lines included, restoring both afterwards."""
    saved = sys.stdout, sys.stderr
    with open(path, 'a', encoding='utf-8') as log:
        log.write(preamble)
        log.flush()
        screen = TerminalLines(log, durable=True)
        tees = TeeToLog(sys.stdout, screen), TeeToLog(sys.stderr, screen)
        moved = _log_handlers_to(tees)
        sys.stdout, sys.stderr = tees
        try:
            yield
        finally:
            for handler, stream in moved:     # back to the stream each held
                handler.setStream(stream)
            teed = {id(tee): stream for tee, stream in zip(tees, saved)}
            for handler in _stream_handlers():     # made during the run, it found a tee: never a closed log
                if id(handler.stream) in teed:
                    handler.setStream(teed[id(handler.stream)])
            sys.stdout, sys.stderr = saved
            screen.close()


def show_progress_bars(enabled: bool) -> None:
    """--progress_bars / --no_progress_bars for every library that draws bars: the Trainer's (through
    TrainingArguments.disable_tqdm), transformers' loading and saving, datasets' map, the hub's downloads."""
    if enabled:
        transformers_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        hub_utils.enable_progress_bars()
    else:
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()
