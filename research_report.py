"""Everything written for people and files: the output folder (refuse a foreign one, archive an earlier
run), the run log, per-pipeline results (JSON + CSV), exported stage models with their model cards, the
stage table, the ablation summary (CSV + Markdown, mean +- std over seeds/folds), the Pareto plots, and an
aggregator that combines the results of several runs (e.g. a bash sweep over --kd_alpha).

    python research_report.py runs/alpha_0.3 runs/alpha_0.5 runs/alpha_0.7 --output runs/alpha_sweep
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import datasets
import huggingface_hub.utils as hub_utils
import numpy as np
import pandas as pd
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from transformers.utils import logging as transformers_logging

from research_compression_config import (PIPELINE_CONFIGS, STAGE_IDENTITY, STAGES, TOOL_MARKER, TOOL_OUTPUTS,
                                         stage_summary)
from research_data import TOKENIZATION_CACHE_PREFIX
from research_errors import UsageError
from research_files import (TEMPORARY_TAG, folder_size, fresh_folder_inside, remove_abandoned_temporaries, remove_entry,
                            temporary_path, write_json_atomically)
from research_inference import read_info, set_threshold
from research_kd import TEACHER_LOGITS_PREFIX
from research_models import hub_model_id
from research_output_guard import output_entries
from research_stages import STORE_FOLDER, StageStore, copy_stage
from research_training import resumable_checkpoint

RESULTS_JSON = 'results_final.json'
RESULTS_CSV = 'results_final.csv'
CONFIG_JSON = 'config.json'
RUN_LOG = 'run.log'
STAGE_LOG = 'stage_log.json'

SUMMARY_METRICS = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'size_mb', 'size_mb_compressed',
                   'compression_ratio', 'compression_ratio_compressed', 'params_nonzero', 'sparsity_overall',
                   'latency_ms_p50', 'speedup', 'speedup_iqr', 'peak_memory_mb']
DELTA_METRICS = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'size_mb', 'latency_ms_p50']


# ---------------------------------------------------------------------------------------------
# Output folder: refuse a foreign non-empty folder, never silently overwrite an earlier run, and never
# move or delete anything but the tool's own files
# ---------------------------------------------------------------------------------------------

ARCHIVE_DIR = 'previous_runs'


def is_tool_output(name: str) -> bool:
    """A top-level name the tool writes, or the temporary of one left by an interrupted write."""
    base = name.split(TEMPORARY_TAG)[0]
    return (base[:-len('.tmp')] if base.endswith('.tmp') else base) in TOOL_OUTPUTS


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
            archive = archive_folder(out)
            os.makedirs(archive)
            # config.json last: a move interrupted half-way still leaves a folder recognised as an earlier run
            for name in sorted(ours, key=lambda n: n == CONFIG_JSON):
                os.rename(os.path.join(out, name), os.path.join(archive, name))
            kept = len(output_entries(out)) - 1
            print(f'[output] {out} ' + ('held an earlier run' if earlier else "has entries named like this tool's outputs")
                  + f': {", ".join(ours)} moved to {archive}'
                  + (f'; {kept} other entr{"y" if kept == 1 else "ies"} left in place' if kept else ''))
    os.makedirs(out, exist_ok=True)


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


@contextlib.contextmanager
def run_log(path: str, preamble: str = ''):
    """Tee stdout and stderr into `path` (appended, after `preamble`) as a terminal finally shows them,
    restoring both afterwards."""
    saved = sys.stdout, sys.stderr
    with open(path, 'a', encoding='utf-8') as log:
        log.write(preamble)
        log.flush()
        screen = TerminalLines(log, durable=True)
        sys.stdout, sys.stderr = TeeToLog(sys.stdout, screen), TeeToLog(sys.stderr, screen)
        try:
            yield
        finally:
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


# ---------------------------------------------------------------------------------------------
# Results of one pipeline run, the stage table, exported models
# ---------------------------------------------------------------------------------------------

RESULT_COLUMNS = ['stage', 'f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro',
                  'size_mb', 'size_mb_compressed', 'params_total', 'params_nonzero', 'sparsity_pruned_layers',
                  'sparsity_overall', 'vocab_size', 'test_unknown_token_share', 'latency_ms_mean', 'latency_ms_p50',
                  'latency_ms_p95', 'latency_ms_p99', 'latency_ms_iqr', 'throughput_samples_s', 'peak_memory_mb',
                  'peak_memory_model_mb', 'compression_ratio', 'compression_ratio_compressed', 'speedup', 'speedup_iqr',
                  'latency_noisy', 'speedup_vs_fp32_onnx', 'runtime_speedup_onnx_vs_pytorch', 'model_dir']


def flatten_stage(stage: Dict, label_names: Sequence[str]) -> Dict:
    """One CSV row: the scalar metrics, then per-label metrics as `<label>_<metric>` columns."""
    row = {k: stage.get(k) for k in RESULT_COLUMNS}
    row.update({k: v for k, v in stage.items() if k not in row and not isinstance(v, (dict, list))})
    for name in label_names:
        for metric, value in stage['per_label'][name].items():
            row[f'{name}_{metric}'] = value
    return row


def write_pipeline_results(folder: str, args, pipeline: str, stages: List[Dict], run) -> None:
    """results_final.json / .csv of one pipeline: one entry per stage in order, the last is the final model."""
    os.makedirs(folder, exist_ok=True)
    payload = {'pipeline': pipeline, 'author_name': args.author_name, 'fold': run.data.fold, 'train_seed': run.seed,
               'test_split_hash': run.data.test_split_hash, 'test_rows': int(len(run.data.test_idx)), 'stages': stages}
    rows = pd.DataFrame([flatten_stage(s, args.label_columns) for s in stages])
    rows.insert(0, 'pipeline', pipeline)
    tmp = temporary_path(os.path.join(folder, RESULTS_CSV))
    rows.to_csv(tmp, index=False)
    os.replace(tmp, os.path.join(folder, RESULTS_CSV))
    write_json_atomically(os.path.join(folder, RESULTS_JSON), payload)


def export_stage_models(folder: str, args, pipeline: str, stages: List[Dict], nodes) -> None:
    """Copy the final stage (every stage with --save_all_stages) out of the stage store into
    `folder/stages/<stage>/`, with this run's --threshold and a model card; other stages get model_dir null.
    The target is emptied first without following a symbolic link or leaving the output folder."""
    for i, (stage, node) in enumerate(zip(stages, nodes)):
        if not (args.save_all_stages or i == len(stages) - 1):
            stage['model_dir'] = None
            continue
        target = os.path.join(folder, 'stages', stage['stage'])
        for note in fresh_folder_inside(args.output_dir, target):
            print(f'[output] {note}')
        copy_stage(node, target)
        set_threshold(target, args.threshold)
        stage['model_dir'] = os.path.abspath(target)
        write_model_card(target, pipeline, stage, vars(args))


def format_stage_table(stages: List[Dict]) -> str:
    """The stage table printed at the end of a run: quality, raw and zipped size, sparsity, latency and the
    speed-up (median of interleaved rounds, ± its IQR); `!` marks a noisy timing, `*` a runtime change."""
    def fmt(value, spec):
        return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
    lines = [f'{"stage":<10} {"F1-macro":>9} {"size MB":>8} {"zip MB":>8} {"nonzero":>11} {"sparsity":>9} '
             f'{"p50 ms":>8} {"x smaller":>9} {"x faster":>15}']
    for s in stages:
        faster = f'{fmt(s["speedup"], ".2f")} ± {fmt(s.get("speedup_iqr"), ".2f")}'
        faster += ('!' if s.get('latency_noisy') else '') + ('*' if s.get('speedup_includes_runtime_change') else '')
        lines.append(f'{s["stage"]:<10} {fmt(s["f1_macro"], ".4f"):>9} {fmt(s["size_mb"], ".2f"):>8} '
                     f'{fmt(s.get("size_mb_compressed"), ".2f"):>8} {s["params_nonzero"]:>11,} '
                     f'{fmt(s["sparsity_overall"], ".1%"):>9} {fmt(s["latency_ms_p50"], ".2f"):>8} '
                     f'{fmt(s["compression_ratio"], ".2f"):>9} {faster:>15}')
    first = stages[0]
    lines.append(f'x faster: median over interleaved rounds of the teacher/stage time ratio ± IQR; batch '
                 f'{first.get("latency_batch_size")} x {first.get("latency_seq_len")} tokens, '
                 f'{first.get("latency_threads")} intra-op thread(s) in every runtime.')
    for s in stages:
        if s.get('speedup_includes_runtime_change'):
            lines.append(f'* {s["stage"]}: includes PyTorch -> ONNX Runtime; the same parent model in ONNX Runtime at '
                         f'fp32 is {fmt(s.get("runtime_speedup_onnx_vs_pytorch"), ".2f")}x PyTorch, and this stage is '
                         f'{fmt(s.get("speedup_vs_fp32_onnx"), ".2f")}x that fp32 ONNX model.')
        if s.get('latency_noisy'):
            lines.append(f'! {s["stage"]}: {s.get("latency_warning")}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Summary table
# ---------------------------------------------------------------------------------------------

def final_stage_row(pipeline: str, stages: List[Dict], label_names: Sequence[str], run: str) -> Dict:
    """One row per pipeline run: the final stage's metrics, per-label F1 and deltas against the baseline."""
    final, base = stages[-1], stages[0]
    row = {'pipeline': pipeline, 'run': run}
    row.update({m: final.get(m) for m in SUMMARY_METRICS})
    row.update({f'f1_{label}': final['per_label'][label]['f1'] for label in label_names})
    row.update({f'delta_{m}': final[m] - base[m] for m in DELTA_METRICS})
    return row


def summarize_runs(rows: List[Dict]) -> pd.DataFrame:
    """Mean and (when there are several runs per pipeline) standard deviation of every column, in the
    order the pipelines first appear."""
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame['pipeline']))
    numeric = [c for c in frame.columns if c not in ('pipeline', 'run')]
    grouped = frame.groupby('pipeline', sort=False)[numeric]
    summary = grouped.mean()
    if frame.groupby('pipeline').size().max() > 1:
        spread = grouped.std(ddof=1).add_suffix('_std')
        summary = summary.join(spread)
    summary.insert(0, 'runs', frame.groupby('pipeline', sort=False).size())
    return summary.loc[order].reset_index()


def _cell(value, std=None, spec='.4f'):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    text = format(value, spec)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f' ± {format(std, spec)}'
    return text


def summary_markdown(summary: pd.DataFrame, label_names: Sequence[str], split_note: str) -> str:
    columns = [('f1_macro', '.4f'), ('delta_f1_macro', '+.4f'), ('f1_weighted', '.4f'), ('f1_micro', '.4f'),
               ('exact_match', '.4f'), ('size_mb', '.2f'), ('size_mb_compressed', '.2f'), ('compression_ratio', '.2f'),
               ('compression_ratio_compressed', '.2f'), ('params_nonzero', ',.0f'), ('sparsity_overall', '.1%'),
               ('latency_ms_p50', '.2f'), ('speedup', '.2f'), ('speedup_iqr', '.2f'), ('peak_memory_mb', '.1f')]
    columns += [(f'f1_{label}', '.3f') for label in label_names]
    header = ['pipeline', 'runs'] + [c for c, _ in columns]
    lines = [f'Scored on {split_note}. Cells are mean ± std over runs where there are several; deltas are against '
             '`baseline` (the teacher) of the same run. `speedup` is the median over interleaved timing rounds of '
             'the teacher/stage time ratio (`speedup_iqr` its interquartile range); `size_mb_compressed` is the '
             'weight files zipped (DEFLATE).', '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for _, row in summary.iterrows():
        cells = [row['pipeline'], str(int(row['runs']))]
        cells += [_cell(row.get(c), row.get(f'{c}_std'), spec) for c, spec in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_summary(summary: pd.DataFrame, output_dir: str, label_names: Sequence[str], split_note: str,
                  basename: str = 'ablation_summary') -> None:
    summary.to_csv(os.path.join(output_dir, f'{basename}.csv'), index=False)
    with open(os.path.join(output_dir, f'{basename}.md'), 'w', encoding='utf-8') as fh:
        fh.write(summary_markdown(summary, label_names, split_note))


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower cost and higher quality), by cost."""
    order = np.lexsort((-quality, cost))
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return np.asarray(front, dtype=int)


def plot_quality_vs_cost(summary: pd.DataFrame, cost: str, xlabel: str, path: str, log_x: bool = False) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    x, y = summary[cost].to_numpy(float), summary['f1_macro'].to_numpy(float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xerr = summary.get(f'{cost}_std')
    yerr = summary.get('f1_macro_std')
    ax.errorbar(x, y, xerr=None if xerr is None else xerr.to_numpy(float), yerr=None if yerr is None else yerr.to_numpy(float),
                fmt='o', color='tab:blue', ecolor='lightgray', capsize=2)
    for xi, yi, name in zip(x, y, summary['pipeline']):
        ax.annotate(name, (xi, yi), textcoords='offset points', xytext=(4, 4), fontsize=8)
    front = pareto_front(x, y)
    ax.plot(x[front], y[front], '--', color='tab:red', label='Pareto front')
    ax.scatter(x[front], y[front], s=90, facecolors='none', edgecolors='tab:red')
    if log_x:
        ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('macro-F1 (test)')
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.1)  # room for the pipeline names next to the outermost points
    ax.legend(loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_label_f1(summary: pd.DataFrame, label_names: Sequence[str], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(summary)), 4.4))
    width = 0.8 / len(label_names)
    positions = np.arange(len(summary))
    for j, label in enumerate(label_names):
        ax.bar(positions + j * width, summary[f'f1_{label}'], width, label=label)
    ax.set_xticks(positions + width * (len(label_names) - 1) / 2)
    ax.set_xticklabels(summary['pipeline'], rotation=30, ha='right')
    ax.set_ylabel('F1 (test)')
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(label_names), fontsize=8, loc='upper center', bbox_to_anchor=(0.5, 1.12))
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(summary: pd.DataFrame, output_dir: str, label_names: Sequence[str]) -> List[str]:
    paths = [os.path.join(output_dir, name) for name in ('f1_vs_size.png', 'f1_vs_latency.png', 'per_label_f1.png')]
    plot_quality_vs_cost(summary, 'size_mb', 'size on disk (MB)', paths[0])
    plot_quality_vs_cost(summary, 'latency_ms_p50', 'CPU latency p50 (ms)', paths[1])
    plot_per_label_f1(summary, label_names, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------

# results key -> (metric type, its config, its name) of the model-index (Hugging Face eval results)
CARD_METRICS = {
    'f1_macro': ('f1', 'macro', 'F1 (macro)'),
    'f1_micro': ('f1', 'micro', 'F1 (micro)'),
    'f1_weighted': ('f1', 'weighted', 'F1 (weighted)'),
    'exact_match': ('exact_match', None, 'Exact match (every label right)'),
    'hamming_loss': ('hamming_loss', None, 'Hamming loss'),
    'roc_auc_macro': ('roc_auc', 'macro', 'ROC-AUC (macro)'),
}
# compression_info.json format -> the card's library_name (None: only this tool's loader reads the folder)
CARD_LIBRARY = {'hf': 'transformers', 'hf_bnb4': 'transformers', 'onnx': 'onnx'}


def stage_kinds_so_far(pipeline: str, stage_name: str) -> List[str]:
    """The stage kinds that made this stage's model: its pipeline's chain up to and including it."""
    chain = PIPELINE_CONFIGS[pipeline].chain
    return list(chain[:[STAGES[kind].name for kind in chain].index(stage_name) + 1])


def base_model_of(kinds: Sequence[str], settings: Dict) -> Optional[str]:
    """The hub model this one was made from: the --student_path of a hub student, else the teacher (a hub
    --teacher_checkpoint, the base model named by a local checkpoint's card, or --teacher_path); None if local."""
    if 'kd' in kinds and not settings.get('student_layers'):
        return hub_model_id(settings.get('student_path'))
    checkpoint = settings.get('teacher_checkpoint')
    if checkpoint:
        card = os.path.join(checkpoint, 'README.md')
        named = (metadata_load(card) or {}).get('base_model') if os.path.isfile(card) else None
        return hub_model_id(checkpoint) or named
    return hub_model_id(settings.get('teacher_path'))


def card_eval_results(result: Dict, settings: Dict, info: Dict) -> List[EvalResult]:
    """The test-split metrics of results_final.json as Hugging Face eval results (finite values only)."""
    dataset_id = settings.get('hub_dataset_id')
    split = info.get('split') or {}
    common = dict(task_type='text-classification', task_name='Multi-label text classification',
                  dataset_type=dataset_id or 'csv', dataset_name=dataset_id or os.path.basename(settings['dataset_path']),
                  dataset_split='test',
                  dataset_args={k: split[k] for k in ('num_folds', 'fold', 'seed', 'data_fraction', 'test_split_hash')
                                if k in split} or None)
    values = [(key, kind, config, name, result.get(key)) for key, (kind, config, name) in CARD_METRICS.items()]
    values += [(f'{label}_f1', 'f1', label, f'F1 ({label})', m['f1']) for label, m in result['per_label'].items()]
    return [EvalResult(metric_type=kind, metric_config=config, metric_name=name, metric_value=value, **common)
            for _, kind, config, name, value in values
            if isinstance(value, (int, float)) and math.isfinite(value)]


def card_metadata(pipeline: str, result: Dict, settings: Dict, info: Dict) -> ModelCardData:
    """Hugging Face model-card metadata: language, license, library, task, tags (the techniques that made this
    stage), base model, dataset, metrics and the model-index with the test-split results."""
    kinds = stage_kinds_so_far(pipeline, result['stage'])
    tags = ['text-classification', 'multi-label-classification', 'model-compression']
    if 'kd' in kinds:
        tags += ['knowledge-distillation', f'kd-{settings["kd_method"]}']
    if 'prune' in kinds:
        tags += ['pruning', f'{settings["prune_method"]}-pruning']
    if 'quant' in kinds:
        tags += ['quantization', f'{info.get("quant_method", settings["quant_method"])}-quantization']
        tags += [info['weight_dtype']] if info.get('weight_dtype') else []
    if info.get('format') == 'onnx':
        tags += ['onnx', 'onnxruntime']
    library = CARD_LIBRARY.get(info.get('format'))
    if info.get('format') == 'hf_structured' and info.get('loads_with_from_pretrained'):
        library = 'transformers'
    language = settings.get('language') or []
    return ModelCardData(
        language=list(language) if len(language) != 1 else language[0],
        license=settings.get('model_license'), library_name=library, pipeline_tag='text-classification', tags=tags,
        base_model=base_model_of(kinds, settings), datasets=[settings['hub_dataset_id']] if settings.get('hub_dataset_id') else None,
        metrics=sorted({kind for kind, _, _ in CARD_METRICS.values()}),
        model_name=f'{pipeline}-{result["stage"]}', eval_results=card_eval_results(result, settings, info))


def usage_snippet(model_dir: str, info: Dict) -> List[str]:
    """Markdown lines that load the folder with the libraries its format allows."""
    lines = ['```python', 'from research_inference import load_compressed_model  # this repository',
             f"model = load_compressed_model('{model_dir}')", "model.predict(['...'])  # [{label: probability}]", '```', '']
    fmt, max_length = info.get('format'), info.get('max_length', 128)
    if fmt in ('hf', 'hf_bnb4') or (fmt == 'hf_structured' and info.get('loads_with_from_pretrained')):
        lines += ['With `transformers` alone (config.json says `problem_type: multi_label_classification`, so the pipeline '
                  'applies a sigmoid per label):', '', '```python', 'from transformers import pipeline',
                  f"classifier = pipeline('text-classification', model='{model_dir}', top_k=None)",
                  f"classifier(['...'], truncation=True, max_length={max_length})  # [[{{'label': ..., 'score': ...}}, ...]]",
                  '```', '']
    elif fmt == 'onnx':
        lines += ['With `onnxruntime` and a `transformers` tokenizer alone:', '', '```python', ONNX_SNIPPET.format(
            folder=model_dir, max_length=max_length).strip(), '```', '']
    return lines


ONNX_SNIPPET = """
import numpy as np
import onnxruntime as ort
from transformers import AutoConfig, AutoTokenizer

folder = '{folder}'
tokenizer = AutoTokenizer.from_pretrained(folder)
labels = AutoConfig.from_pretrained(folder).id2label
session = ort.InferenceSession(f'{{folder}}/model.onnx', providers=['CPUExecutionProvider'])
batch = tokenizer(['...'], padding=True, truncation=True, max_length={max_length}, return_tensors='np')
logits = session.run(None, {{i.name: batch[i.name] for i in session.get_inputs()}})[0]
probs = 1 / (1 + np.exp(-logits))  # multi-label: one sigmoid per label
print([{{labels[j]: float(p) for j, p in enumerate(row)}} for row in probs])
"""


def model_card(model_dir: str, pipeline: str, result: Dict, config: Dict) -> str:
    """README.md for a saved model: Hugging Face metadata (front matter), then what it is, how it was made, its
    metrics and how to load it."""
    info = read_info(model_dir)
    config = {**config, **PIPELINE_CONFIGS[pipeline].overrides}
    kinds = stage_kinds_so_far(pipeline, result['stage'])
    settings = {'teacher': config.get('teacher_checkpoint') or config.get('teacher_path')}
    shared = set.intersection(*(set(names) for names in STAGE_IDENTITY.values()))
    for kind in kinds[1:]:
        settings.update({k: config.get(k) for k in STAGE_IDENTITY[kind] if k not in shared})
    lines = [f'# {pipeline}: {result["stage"]} model', '',
             f'A multi-label text classifier ({", ".join(config["label_columns"])}; sigmoid outputs, threshold '
             f'{config.get("threshold", 0.5)}) produced by the `{pipeline}` pipeline of this tool '
             f'(stage `{result["stage"]}`), for {config.get("author_name")}.', '',
             '## How it was made', '', f'Data: `{config.get("dataset_path")}` (max_length {config.get("max_length")}, '
             f'seed {config.get("seed")}).', '']
    lines += [f'- {k}: `{v}`' for k, v in settings.items() if v is not None]
    lines += ['', '## Metrics (test split)', '', '| metric | value |', '|---|---|']
    for key in ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro', 'size_mb',
                'size_mb_compressed', 'params_total', 'params_nonzero', 'sparsity_pruned_layers', 'sparsity_overall',
                'vocab_size', 'latency_ms_p50', 'latency_ms_p95', 'compression_ratio', 'speedup', 'speedup_iqr'):
        value = result.get(key)
        lines.append(f'| {key} | {value:.4g} |' if isinstance(value, float) else f'| {key} | {value} |')
    lines += ['', '| label | precision | recall | F1 | ROC-AUC |', '|---|---|---|---|---|']
    for label, m in result['per_label'].items():
        auc = '-' if m['roc_auc'] is None else f'{m["roc_auc"]:.3f}'
        lines.append(f'| {label} | {m["precision"]:.3f} | {m["recall"]:.3f} | {m["f1"]:.3f} | {auc} |')
    lines += ['', f'Latency: batch {result.get("latency_batch_size")} x {result.get("latency_seq_len")} tokens on '
              f'{result.get("latency_device")}.', '', '## Load it', '']
    lines += usage_snippet(model_dir, info)
    metadata = card_metadata(pipeline, result, config, info)
    return f'---\n{metadata.to_yaml()}\n---\n\n' + '\n'.join(lines)


def write_model_card(model_dir: str, pipeline: str, result: Dict, config: Dict) -> None:
    ModelCard(model_card(model_dir, pipeline, result, config)).save(os.path.join(model_dir, 'README.md'))


# ---------------------------------------------------------------------------------------------
# The cache folder: what it holds (--cache_report) and removing what is not used (--cache_prune_older_than)
# ---------------------------------------------------------------------------------------------

def cache_entries(cache_dir: str) -> List[Dict]:
    """The tokenization and teacher-logit caches in `cache_dir` (only those names: nothing else there is
    ever listed or removed), with size and last use (their modification time is renewed on every read)."""
    kinds = {TOKENIZATION_CACHE_PREFIX: 'tokenization', TEACHER_LOGITS_PREFIX: 'teacher logits'}
    rows = []
    for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        kind = next((k for prefix, k in kinds.items() if name.startswith(prefix) and TEMPORARY_TAG not in name), None)
        path = os.path.join(cache_dir, name)
        if kind and not os.path.islink(path):
            rows.append({'kind': kind, 'name': name, 'path': path, 'bytes': folder_size(path),
                         'last_used': os.path.getmtime(path)})
    return rows


def _when(timestamp) -> str:
    return '-' if not timestamp else time.strftime('%Y-%m-%d %H:%M', time.localtime(timestamp))


def cache_report(cache_dir: str) -> str:
    """What --cache_dir holds: every stage of the store (kind, key, size, when stored and last used, the settings
    that made it) and the tokenization/teacher-logit caches, with the disk use and how to prune."""
    store = StageStore.in_cache_dir(cache_dir, resumable=resumable_checkpoint)
    stages, caches = store.stored_stages(), cache_entries(cache_dir)
    mb = lambda n: f'{n / 2 ** 20:.1f}'
    lines = [f'Stage store {store.root}: {len(stages)} stage folder(s), {mb(sum(r["bytes"] for r in stages))} MB', '']
    if stages:
        lines.append(f'{"kind":<8} {"key":<16} {"MB":>8}  {"stored":<16}  {"last used":<16}  settings')
        for row in stages:
            state = '' if row['state'] == 'stored' else f'  [{row["state"]}]'
            lines.append(f'{row["kind"]:<8} {row["key"]:<16} {mb(row["bytes"]):>8}  {_when(row["stored"]):<16}  '
                         f'{_when(row["last_used"]):<16}  {stage_summary(row["kind"], row["settings"]) or "-"}{state}')
        lines.append('')
    for kind in ('tokenization', 'teacher logits'):
        rows = [r for r in caches if r['kind'] == kind]
        lines.append(f'{kind} caches: {len(rows)}, {mb(sum(r["bytes"] for r in rows))} MB'
                     + (f', last used {_when(max(r["last_used"] for r in rows))}' if rows else ''))
    lines += [f'Disk use of {cache_dir}: {mb(folder_size(cache_dir))} MB in all.', '',
              'To free space: python research_main.py --cache_dir DIR --cache_prune_older_than DAYS removes the stored '
              'stages and caches not used for DAYS days (0: all that no running run holds); or delete any '
              f'{STORE_FOLDER}/<kind>-<key> folder by hand. A removed stage is rebuilt when a run needs it again.']
    return '\n'.join(lines)


def prune_cache(cache_dir: str, older_than_days: float) -> str:
    """Remove the stages (never one a live run holds), caches and leftovers of dead runs not used for
    `older_than_days` days; returns what was freed."""
    store = StageStore.in_cache_dir(cache_dir)
    before = folder_size(cache_dir)
    leftovers = store.remove_abandoned() + remove_abandoned_temporaries(cache_dir)
    stages = store.remove_unused(older_than_days)
    cutoff = time.time() - older_than_days * 86400
    caches = [row for row in cache_entries(cache_dir) if row['last_used'] <= cutoff]
    for row in caches:
        remove_entry(row['path'])
    freed = (before - folder_size(cache_dir)) / 2 ** 20
    return (f'[cache] removed {len(stages)} stage(s), {len(caches)} cache(s) and {len(leftovers)} leftover(s) of '
            f'interrupted runs not used for {older_than_days:g} day(s): {freed:.1f} MB freed in {cache_dir}')


# ---------------------------------------------------------------------------------------------
# Aggregating several runs (a bash sweep)
# ---------------------------------------------------------------------------------------------

def find_results(paths: Sequence[str]) -> List[str]:
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ('previous_runs', 'stages', 'model')]
            if 'results_final.json' in files:
                found.append(os.path.join(root, 'results_final.json'))
    return sorted(found)


def run_config(results_path: str) -> Dict:
    """The config.json of the run a results file belongs to (the nearest one up the tree; a multi-seed or
    multi-fold run keeps its results five folders below it: runs/fold<F>_seed<S>/pipelines/<pipeline>/)."""
    folder = os.path.dirname(os.path.abspath(results_path))
    for _ in range(6):
        candidate = os.path.join(folder, 'config.json')
        if os.path.isfile(candidate):
            with open(candidate, encoding='utf-8') as fh:
                return json.load(fh)
        folder = os.path.dirname(folder)
    return {}


def aggregate_runs(paths: Sequence[str]) -> Tuple[pd.DataFrame, List[str]]:
    """One row per results file (its final stage), plus the settings that differ between the runs."""
    rows, configs = [], []
    for path in find_results(paths):
        with open(path, encoding='utf-8') as fh:
            results = json.load(fh)
        config = run_config(path)
        labels = list(results['stages'][-1]['per_label'])
        rows.append(final_stage_row(results['pipeline'], results['stages'], labels, os.path.dirname(path)))
        configs.append(config)
    if not rows:
        raise SystemExit('error: no results_final.json found under the given paths.')
    ignore = {'output_dir', 'overwrite_output_dir', 'tool', 'ablation_pipelines', 'run_ablation', 'save_all_stages',
              'pipelines', 'report_to', 'progress_bars', 'language', 'model_license', 'hub_dataset_id'}
    keys = sorted({k for c in configs for k in c} - ignore)
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    frame = pd.DataFrame(rows)
    for k in reversed(varying):
        frame.insert(2, k, [json.dumps(c.get(k)) if isinstance(c.get(k), (list, dict)) else c.get(k) for c in configs])
    return frame, varying


def plot_sweep(frame: pd.DataFrame, parameter: str, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for pipeline, group in frame.groupby('pipeline', sort=False):
        group = group.sort_values(parameter)
        ax.plot(group[parameter], group['f1_macro'], 'o-', label=pipeline)
    ax.set_xlabel(parameter)
    ax.set_ylabel('macro-F1 (test)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Combine the results of several runs of research_main.py into one '
                                                 'table (CSV + Markdown) and plots.')
    parser.add_argument('paths', nargs='+', help='Run folders (searched recursively for results_final.json) or files.')
    parser.add_argument('--output', default='report', help='Folder for report.csv, report.md and the plots.')
    parsed = parser.parse_args(argv)
    frame, varying = aggregate_runs(parsed.paths)
    os.makedirs(parsed.output, exist_ok=True)
    frame.to_csv(os.path.join(parsed.output, 'report.csv'), index=False)
    shown = ['pipeline'] + varying + ['f1_macro', 'delta_f1_macro', 'size_mb', 'sparsity_overall', 'latency_ms_p50', 'speedup']
    table = frame[shown].to_markdown(index=False, floatfmt='.4f')
    with open(os.path.join(parsed.output, 'report.md'), 'w', encoding='utf-8') as fh:
        fh.write(table + '\n')
    print(table)
    numeric = [p for p in varying if pd.api.types.is_numeric_dtype(frame[p])]
    for parameter in numeric:
        plot_sweep(frame, parameter, os.path.join(parsed.output, f'f1_vs_{parameter}.png'))
    summary = frame.groupby('pipeline', sort=False)[['f1_macro', 'size_mb', 'latency_ms_p50']].mean().reset_index()
    if len(summary) > 1:
        plot_quality_vs_cost(summary, 'size_mb', 'size on disk (MB)', os.path.join(parsed.output, 'f1_vs_size.png'))
    print(f'\n{len(frame)} runs; varying settings: {", ".join(varying) or "none"}; written to {parsed.output}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
