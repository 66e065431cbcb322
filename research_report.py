"""Combine the results of several runs (e.g. a bash sweep over --kd_alpha, or over --pipeline) into one table
(CSV + Markdown) and plots; the settings that differ between the runs become columns. Damaged or mixed inputs
(a cut-short results file, runs of other label sets, an --output that is a file) are refused with exit 2;
speed-ups compare (each against its own run's teacher), absolute latencies of separate runs are marked as not.

    python research_report.py runs/alpha_0.3 runs/alpha_0.5 runs/alpha_0.7 --output runs/alpha_sweep
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import pandas as pd

from research_errors import UsageError
from research_files import folder_problem
from research_output import ARCHIVE_DIR, CONFIG_JSON, RESULTS_JSON
from research_plots import plot_quality_vs_cost, plot_sweep
from research_results import final_stage_row
from research_settings import FIELD_OWNER, changes_result


# Settings that change no reported number: the settings declared `result=False` (where files go, what is
# printed, how the store is kept), except those that change a measurement or a score though not a stage; and
# the record's own bookkeeping (each row names its pipeline)
MEASUREMENT_SETTINGS = {'threshold', 'latency_batch_size', 'latency_runs', 'latency_threads', 'latency_budget_s',
                        'latency_tolerance', 'latency_noise_bound'}
NOT_RESULT_SETTINGS = ({name for name in FIELD_OWNER if not changes_result(name)} - MEASUREMENT_SETTINGS) | {
    'tool', 'pipelines', 'pipeline', 'run_ablation', 'ablation_pipelines'}
from research_stat_tables import quality_cell


def find_results(paths: Sequence[str]) -> List[str]:
    """Every results_final.json under `paths`, each once however often it is reached (a folder given twice,
    or given beside a folder inside it)."""
    found = {}
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"'{path}' does not exist. Pass run folders (the --output_dir of research_main.py runs) "
                             f'or {RESULTS_JSON} files.')
        for file in [path] if os.path.isfile(path) else results_files_under(path):
            found.setdefault(os.path.realpath(file), file)
    return sorted(found.values())


def results_files_under(folder: str) -> List[str]:
    """The results files of the runs in `folder` (archived earlier runs and exported models skipped)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in (ARCHIVE_DIR, 'stages', 'model'))
        if RESULTS_JSON in names:
            found.append(os.path.join(root, RESULTS_JSON))
    return found


def read_json_file(path: str, what: str):
    try:
        with open(path, encoding='utf-8') as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"The {what} '{path}' cannot be read ({type(exc).__name__}: {exc}); it is damaged or was cut "
                         'short (a run that was killed while writing it?). Re-run that run, or leave its folder out of '
                         'the paths.') from exc


def read_results(path: str) -> Dict:
    """A results file with what the report reads: its pipeline and stages, the final one with per-label metrics."""
    results = read_json_file(path, 'results file')
    stages = results.get('stages') if isinstance(results, dict) else None
    if not isinstance(results, dict) or not isinstance(results.get('pipeline'), str) or not stages \
            or not all(isinstance(s, dict) for s in stages) or not isinstance(stages[-1].get('per_label'), dict):
        raise UsageError(f"'{path}' is not a results file of research_main.py (it needs 'pipeline' and 'stages', the "
                         "last with 'per_label'). Re-run that run, or leave its folder out of the paths.")
    return results


def run_config(results_path: str) -> Dict:
    """The config.json of the run a results file belongs to (the nearest one up the tree; a multi-seed or
    multi-fold run keeps its results five folders below it: runs/fold<F>_seed<S>/pipelines/<pipeline>/), with
    its path under `_path` ({} when there is none)."""
    folder = os.path.dirname(os.path.abspath(results_path))
    for _ in range(6):
        candidate = os.path.join(folder, CONFIG_JSON)
        if os.path.isfile(candidate):
            config = read_json_file(candidate, 'run configuration')
            return {**config, '_path': candidate} if isinstance(config, dict) else {'_path': candidate}
        folder = os.path.dirname(folder)
    return {}


def refuse_mixed_label_sets(paths: Sequence[str], labels: Sequence[Tuple[str, ...]]) -> None:
    """Macro-F1 over other labels is another number: one report holds runs of one label set."""
    sets = list(dict.fromkeys(labels))
    if len(sets) > 1:
        examples = [f"{paths[labels.index(s)]} scores {', '.join(s)}" for s in sets[:2]]
        raise UsageError(f'The runs score different label sets ({"; ".join(examples)}), so their F1 scores cannot be '
                         'compared. Aggregate the runs of one --label_columns set at a time.')


def latency_groups(configs: Sequence[Dict], results: Sequence[Dict]) -> List[str]:
    """Which rows had their latencies measured side by side (one run folder, one fold and seed): A, B, ..."""
    keys = [(c.get('_path'), r.get('fold'), r.get('train_seed')) for c, r in zip(configs, results)]
    names = {key: chr(ord('A') + i) if i < 26 else f'G{i}' for i, key in enumerate(dict.fromkeys(keys))}
    return [names[key] for key in keys]


def aggregate_runs(paths: Sequence[str]) -> Tuple[pd.DataFrame, List[str]]:
    """One row per results file (its final stage), plus the settings that differ between the runs. Speed-ups
    are each against the teacher of the row's own run; `latency_group` says which rows' absolute latencies
    were measured side by side (only those compare)."""
    files = find_results(paths)
    if not files:
        raise UsageError(f"No {RESULTS_JSON} found under {', '.join(paths)}. Pass the --output_dir of finished "
                         'research_main.py runs.')
    results = [read_results(path) for path in files]
    configs = [run_config(path) for path in files]
    labels = [tuple(r['stages'][-1]['per_label']) for r in results]
    refuse_mixed_label_sets(files, labels)
    rows = [final_stage_row(r['pipeline'], r['stages'], list(l), os.path.dirname(path))
            for r, l, path in zip(results, labels, files)]
    for row, r, group in zip(rows, results, latency_groups(configs, results)):
        row.update(teacher_latency_ms_p50=r['stages'][0].get('latency_ms_p50'), latency_group=group)
    keys = sorted({k for c in configs for k in c if not k.startswith('_')} - NOT_RESULT_SETTINGS)
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    frame = pd.DataFrame(rows)
    for k in reversed(varying):
        frame.insert(2, k, [json.dumps(c.get(k)) if isinstance(c.get(k), (list, dict)) else c.get(k) for c in configs])
    return frame, varying


def sweep_markdown(frame: pd.DataFrame, varying: Sequence[str]) -> str:
    """The report table; with rows from separate measurements, absolute latencies are marked as not comparable."""
    shown = ['pipeline'] + list(varying) + ['f1_macro', 'delta_f1_macro', 'size_mb', 'sparsity_overall', 'speedup',
                                            'latency_ms_p50', 'teacher_latency_ms_p50', 'latency_group']
    if 'f1_macro_ci_low' in frame:   # macro-F1 with its interval and mark (research_stat_tables.quality_cell)
        frame = frame.assign(**{'f1_macro [95% CI]': [quality_cell({**row, 'runs': 1}) for row in frame.to_dict('records')]})
        shown = [('f1_macro [95% CI]' if c == 'f1_macro' else c) for c in shown]
    table = frame[shown].to_markdown(index=False, floatfmt='.4f')
    if frame['latency_group'].nunique() > 1:
        table += ('\n\n`speedup` is each row\'s final stage against the teacher of its own run, timed side by side: '
                  'compare those. `latency_ms_p50` (and the teacher\'s) were measured in separate runs (another '
                  'moment, another load on the machine): they are NOT comparable between rows of different '
                  '`latency_group`.')
    return table


def check_report_folder(output: str) -> None:
    problem = folder_problem(output)
    if problem:
        raise UsageError(f"--output '{output}' {problem}. Pass a folder (new or existing) for report.csv, report.md "
                         'and the plots.')


def write_sweep_report(frame: pd.DataFrame, varying: Sequence[str], output: str) -> None:
    os.makedirs(output, exist_ok=True)
    frame.to_csv(os.path.join(output, 'report.csv'), index=False)
    table = sweep_markdown(frame, varying)
    with open(os.path.join(output, 'report.md'), 'w', encoding='utf-8') as fh:
        fh.write(table + '\n')
    print(table)
    numeric = [p for p in varying if pd.api.types.is_numeric_dtype(frame[p])]
    for parameter in numeric:
        plot_sweep(frame, parameter, os.path.join(output, f'f1_vs_{parameter}.png'))
    summary = frame.groupby('pipeline', sort=False)[['f1_macro', 'size_mb', 'latency_ms_p50']].mean().reset_index()
    if len(summary) > 1:
        plot_quality_vs_cost(summary, 'size_mb', 'size on disk (MB)', os.path.join(output, 'f1_vs_size.png'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Combine the results of several runs of research_main.py into one '
                                                 'table (CSV + Markdown) and plots.')
    parser.add_argument('paths', nargs='+', help='Run folders (searched recursively for results_final.json) or files.')
    parser.add_argument('--output', default='report', help='Folder for report.csv, report.md and the plots.')
    parsed = parser.parse_args(argv)
    try:
        check_report_folder(parsed.output)
        frame, varying = aggregate_runs(parsed.paths)
        write_sweep_report(frame, varying, parsed.output)
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return exc.exit_code
    print(f'\n{len(frame)} runs; varying settings: {", ".join(varying) or "none"}; written to {parsed.output}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
