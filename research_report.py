"""Combine the results of several runs (e.g. a bash sweep over --kd_alpha) into one table (CSV + Markdown) and
plots; the settings that differ between the runs become columns.

    python research_report.py runs/alpha_0.3 runs/alpha_0.5 runs/alpha_0.7 --output runs/alpha_sweep
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import pandas as pd

from research_output import ARCHIVE_DIR, CONFIG_JSON, RESULTS_JSON
from research_plots import plot_quality_vs_cost, plot_sweep
from research_results import final_stage_row


def find_results(paths: Sequence[str]) -> List[str]:
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in (ARCHIVE_DIR, 'stages', 'model')]
            if RESULTS_JSON in files:
                found.append(os.path.join(root, RESULTS_JSON))
    return sorted(found)


def run_config(results_path: str) -> Dict:
    """The config.json of the run a results file belongs to (the nearest one up the tree; a multi-seed or
    multi-fold run keeps its results five folders below it: runs/fold<F>_seed<S>/pipelines/<pipeline>/)."""
    folder = os.path.dirname(os.path.abspath(results_path))
    for _ in range(6):
        candidate = os.path.join(folder, CONFIG_JSON)
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
