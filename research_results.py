"""The results of a run, as files and as tables: per pipeline results_final.json / .csv and the exported stage
models (with their model cards), the stage table printed at the end of a run, and the ablation summary (CSV +
Markdown, mean ± std over seeds/folds).
"""

import math
import os
from typing import Dict, List, Sequence

import pandas as pd

from research_cards import write_model_card
from research_files import fresh_folder_inside, write_json_atomically, written_aside
from research_inference import set_threshold
from research_output import RESULTS_CSV, RESULTS_JSON
from research_stages import copy_stage
from research_stat_tables import STATISTICS_FIELDS, between_run_intervals, interval_legend, mean_std_cell, quality_cell
from research_stats import significance_legend, significance_mark, with_interval

SUMMARY_METRICS = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'size_mb', 'size_mb_compressed',
                   'compression_ratio', 'compression_ratio_compressed', 'params_nonzero', 'sparsity_overall',
                   'latency_ms_p50', 'speedup', 'speedup_iqr', 'speedup_ci_low', 'speedup_ci_high', 'latency_noisy',
                   'peak_memory_mb']
DELTA_METRICS = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'size_mb', 'latency_ms_p50']


# ---------------------------------------------------------------------------------------------
# Results of one pipeline run, the stage table, exported models
# ---------------------------------------------------------------------------------------------

RESULT_COLUMNS = ['stage', 'f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro',
                  'size_mb', 'size_mb_compressed', 'params_total', 'params_nonzero', 'sparsity_pruned_layers',
                  'sparsity_overall', 'vocab_size', 'test_unknown_token_share', 'latency_ms_mean', 'latency_ms_p50',
                  'latency_ms_p95', 'latency_ms_p99', 'latency_ms_iqr', 'throughput_samples_s', 'peak_memory_mb',
                  'peak_memory_model_mb', 'compression_ratio', 'compression_ratio_compressed', 'speedup', 'speedup_iqr',
                  'speedup_ci_low', 'speedup_ci_high', 'latency_rounds', 'latency_seconds', 'latency_converged',
                  'latency_noisy', 'speedup_vs_fp32_onnx', 'runtime_speedup_onnx_vs_pytorch', 'model_dir']


def flatten_stage(stage: Dict, label_names: Sequence[str]) -> Dict:
    """One CSV row: the scalar metrics, then per-label metrics as `<label>_<metric>` columns."""
    row = {k: stage.get(k) for k in RESULT_COLUMNS}
    row.update({k: v for k, v in stage.items() if k not in row and not isinstance(v, (dict, list))})
    for name in label_names:
        for metric, value in stage['per_label'][name].items():
            row[f'{name}_{metric}'] = value
        row[f'{name}_threshold'] = (stage.get('thresholds') or {}).get(name)
    return row


def write_pipeline_results(folder: str, args, pipeline: str, stages: List[Dict], run) -> None:
    """results_final.json / .csv of one pipeline: one entry per stage in order, the last is the final model."""
    os.makedirs(folder, exist_ok=True)
    payload = {'pipeline': pipeline, 'author_name': args.author_name, 'fold': run.data.fold, 'train_seed': run.seed,
               'test_split_hash': run.data.test_split_hash, 'test_rows': int(len(run.data.test_idx)), 'stages': stages,
               'tokenizer_fit': run.tokenizer_fit}
    rows = pd.DataFrame([flatten_stage(s, args.label_columns) for s in stages])
    rows.insert(0, 'pipeline', pipeline)
    with written_aside(os.path.join(folder, RESULTS_CSV)) as tmp:
        rows.to_csv(tmp, index=False)
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
        set_threshold(target, args.threshold, stage.get('thresholds') if args.threshold_strategy == 'per_label' else None)
        stage['model_dir'] = os.path.abspath(target)
        write_model_card(target, pipeline, stage, args.as_dict())


def format_stage_table(stages: List[Dict]) -> str:
    """The stage table printed at the end of a run: quality, raw and zipped size, sparsity, latency and the
    speed-up (median over interleaved rotation cycles, [its 95% interval]); `!` marks a timing that did not
    converge, `*` a runtime change."""
    def fmt(value, spec):
        return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
    lines = [f'{"stage":<10} {"F1-macro [95% CI]":>24} {"size MB":>8} {"zip MB":>8} {"nonzero":>11} {"sparsity":>9} '
             f'{"p50 ms":>8} {"x smaller":>9} {"x faster [95% interval]":>24}']
    for s in stages:
        faster = f'{fmt(s["speedup"], ".2f")} [{fmt(s.get("speedup_ci_low"), ".2f")}, {fmt(s.get("speedup_ci_high"), ".2f")}]'
        faster += ('!' if s.get('latency_noisy') else '') + ('*' if s.get('speedup_includes_runtime_change') else '')
        quality = with_interval(s['f1_macro'], s.get('f1_macro_ci_low'), s.get('f1_macro_ci_high')) + significance_mark(s)
        lines.append(f'{s["stage"]:<10} {quality:>24} {fmt(s["size_mb"], ".2f"):>8} '
                     f'{fmt(s.get("size_mb_compressed"), ".2f"):>8} {s["params_nonzero"]:>11,} '
                     f'{fmt(s["sparsity_overall"], ".1%"):>9} {fmt(s["latency_ms_p50"], ".2f"):>8} '
                     f'{fmt(s["compression_ratio"], ".2f"):>9} {faster:>24}')
    first = stages[0]
    lines.append(significance_legend(first.get('statistics')))
    if first.get('threshold_strategy') == 'per_label':
        lines.append('Thresholds: per label, tuned on the validation split for each stage (macro-F1 at --threshold: '
                     + ', '.join(f'{s["stage"]} {fmt(s.get("f1_macro_at_default_threshold"), ".4f")}' for s in stages) + ').')
    lines.append(f'x faster: median over interleaved rotation cycles of the teacher/stage time ratio [95% bootstrap '
                 f'interval], {first.get("latency_rounds")} rounds in {fmt(first.get("latency_seconds"), ".1f")} s; batch '
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
    final = {**final, 'baseline_f1_macro': base['f1_macro'], 'baseline_f1_macro_ci_low': base.get('f1_macro_ci_low'),
             'baseline_f1_macro_ci_high': base.get('f1_macro_ci_high')}
    row = {'pipeline': pipeline, 'run': run}
    row.update({m: final.get(m) for m in SUMMARY_METRICS})
    row.update({f'f1_{label}': final['per_label'][label]['f1'] for label in label_names})
    for label in label_names:
        for side in ('low', 'high'):
            if f'f1_ci_{side}' in final['per_label'][label]:
                row[f'f1_{label}_ci_{side}'] = final['per_label'][label][f'f1_ci_{side}']
    row.update({f'delta_{m}': final[m] - base[m] for m in DELTA_METRICS})
    row.update({field: final.get(field) for field in STATISTICS_FIELDS if field in final})
    return row


def summarize_runs(rows: List[Dict]) -> pd.DataFrame:
    """Mean and (when there are several runs per pipeline) standard deviation of every column, in the
    order the pipelines first appear."""
    frame = pd.DataFrame(rows)
    if 'significant_vs_baseline' in frame:   # True/False/None -> 1/0/NaN, so it averages like the rest
        frame['significant_vs_baseline'] = [float('nan') if v is None else float(v) for v in frame['significant_vs_baseline']]
    order = list(dict.fromkeys(frame['pipeline']))
    numeric = [c for c in frame.columns if c not in ('pipeline', 'run')]
    grouped = frame.groupby('pipeline', sort=False)[numeric]
    summary = grouped.mean()
    if frame.groupby('pipeline').size().max() > 1:
        spread = grouped.std(ddof=1).add_suffix('_std')
        summary = summary.join(spread).join(between_run_intervals(frame))
    summary.insert(0, 'runs', frame.groupby('pipeline', sort=False).size())
    return summary.loc[order].reset_index()


def summary_markdown(summary: pd.DataFrame, label_names: Sequence[str], split_note: str) -> str:
    with_intervals = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match']
    columns = [('f1_macro', '.4f'), ('delta_f1_macro', '+.4f'), ('f1_weighted', '.4f'), ('f1_micro', '.4f'),
               ('exact_match', '.4f'), ('size_mb', '.2f'), ('size_mb_compressed', '.2f'), ('compression_ratio', '.2f'),
               ('compression_ratio_compressed', '.2f'), ('params_nonzero', ',.0f'), ('sparsity_overall', '.1%'),
               ('latency_ms_p50', '.2f'), ('speedup', '.2f'), ('speedup_iqr', '.2f'),
               ('latency_noisy', '.0%'), ('peak_memory_mb', '.1f')]
    columns += [(f'f1_{label}', '.3f') for label in label_names]
    header = ['pipeline', 'runs'] + [c for c, _ in columns]
    lines = [f'Scored on {split_note}. Cells are mean ± std over runs where there are several; deltas are against '
             '`baseline` (the teacher) of the same run. `speedup` is the median over interleaved timing rounds of '
             'the teacher/stage time ratio (`speedup_iqr` its interquartile range); `size_mb_compressed` is the '
             'weight files zipped (DEFLATE).', '', interval_legend(summary), '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for _, row in summary.iterrows():
        cells = [row['pipeline'], str(int(row['runs']))]
        cells += [quality_cell(row, c) if c in with_intervals else mean_std_cell(row.get(c), row.get(f'{c}_std'), spec)
                  for c, spec in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def compact_summary(summary: pd.DataFrame) -> str:
    """The ablation summary as printed: one short row per pipeline (the full table is ablation_summary.md/.csv);
    `!` marks a speed-up whose timing did not converge in some run."""
    lines = [f'{"pipeline":<16} {"runs":>4} {"macro-F1 [95% CI]":>26} {"size MB":>8} {"x smaller":>9} {"x faster":>9}']
    for _, row in summary.iterrows():
        noisy = '!' if (row.get('latency_noisy') or 0) > 0 else ''
        lines.append(f'{row["pipeline"]:<16} {int(row["runs"]):>4} {quality_cell(row, "f1_macro"):>26} '
                     f'{mean_std_cell(row.get("size_mb"), spec=".2f"):>8} '
                     f'{mean_std_cell(row.get("compression_ratio"), spec=".2f"):>9} '
                     f'{mean_std_cell(row.get("speedup"), spec=".2f") + noisy:>9}')
    lines.append('Full table (every metric, per label, spreads): ablation_summary.md; ! = timing did not converge.')
    return '\n'.join(lines)


def write_summary(summary: pd.DataFrame, output_dir: str, label_names: Sequence[str], split_note: str,
                  basename: str = 'ablation_summary') -> None:
    summary.to_csv(os.path.join(output_dir, f'{basename}.csv'), index=False)
    with open(os.path.join(output_dir, f'{basename}.md'), 'w', encoding='utf-8') as fh:
        fh.write(summary_markdown(summary, label_names, split_note))
