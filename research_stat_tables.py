"""How the statistics of research_stats are shown in the tables people read: the fields a final stage carries
into the ablation summary and the sweep report, the between-run t intervals of a summary, a summary cell
with its interval and significance mark, the legend under the summary, and the model card's lines on the
test size, the comparison with the teacher and the thresholds."""

import math
from typing import Dict, List

import pandas as pd

from research_stats import SIGNIFICANCE_MARK, t_interval, with_interval

# The statistics of a final stage carried into the ablation summary and the sweep report (research_stats)
STATISTICS_FIELDS = ['f1_macro_ci_low', 'f1_macro_ci_high', 'f1_weighted_ci_low', 'f1_weighted_ci_high',
                     'f1_micro_ci_low', 'f1_micro_ci_high', 'exact_match_ci_low', 'exact_match_ci_high',
                     'roc_auc_macro', 'roc_auc_macro_ci_low', 'roc_auc_macro_ci_high', 'delta_f1_macro_ci_low',
                     'delta_f1_macro_ci_high', 'p_vs_baseline', 'p_vs_parent', 'significant_vs_baseline',
                     'f1_macro_at_default_threshold', 'test_texts', 'baseline_f1_macro', 'baseline_f1_macro_ci_low',
                     'baseline_f1_macro_ci_high']
# Between-run (seed/fold) t intervals of the mean, in the summary of several runs per pipeline
T_INTERVAL_METRICS = ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'delta_f1_macro']


def between_run_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Per pipeline, the 95 % Student-t interval of the mean over its runs (seeds, folds) of the quality
    metrics (`<metric>_mean_ci_low/_high`), and in how many runs the final stage was significantly different
    from the teacher (`significant_runs`)."""
    rows = {}
    for pipeline, group in frame.groupby('pipeline', sort=False):
        row = {}
        for metric in (m for m in group if m in T_INTERVAL_METRICS or f'{m}_ci_low' in group):
            interval = t_interval(group[metric].tolist())
            row[f'{metric}_mean_ci_low'], row[f'{metric}_mean_ci_high'] = interval['ci_low'], interval['ci_high']
        if 'significant_vs_baseline' in group:
            row['significant_runs'] = int((group['significant_vs_baseline'] == 1).sum())
        rows[pipeline] = row
    return pd.DataFrame.from_dict(rows, orient='index')


def quality_cell(row, metric: str = 'f1_macro') -> str:
    """A summary cell with its interval: the bootstrap interval of a single run, or mean ± std with the t
    interval of the mean over several; marked when significantly different from the teacher (in every run)."""
    runs = int(row.get('runs', 1) or 1)
    significant = row.get('significant_runs') == runs if runs > 1 else row.get('significant_vs_baseline') == 1
    mark = SIGNIFICANCE_MARK if significant and metric == 'f1_macro' else ''
    if runs > 1:
        text = mean_std_cell(row.get(metric), row.get(f'{metric}_std'))
        low, high = row.get(f'{metric}_mean_ci_low'), row.get(f'{metric}_mean_ci_high')
        return (text + (f' [{low:.3f}, {high:.3f}]' if _finite(low) and _finite(high) else '') + mark)
    return with_interval(row.get(metric), _finite_or_none(row.get(f'{metric}_ci_low')),
                         _finite_or_none(row.get(f'{metric}_ci_high'))) + mark


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value):
    return value if _finite(value) else None


def mean_std_cell(value, std=None, spec='.4f'):
    """`0.4615 ± 0.0172`: a spread has no sign, even where the value carries one (`+.4f` deltas)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    text = format(value, spec)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f' ± {format(std, spec.replace("+", ""))}'
    return text


def interval_legend(summary: pd.DataFrame) -> str:
    """What the brackets and the mark of the summary's quality cells are."""
    if 'f1_macro_ci_low' not in summary or summary['f1_macro_ci_low'].isna().all():
        return 'No intervals: statistics were off (--bootstrap_resamples 0).'
    if int(summary['runs'].max()) > 1:
        return ('[a, b]: 95 % Student-t interval of the mean over the runs (seeds/folds); '
                f'{SIGNIFICANCE_MARK} = macro-F1 significantly different from the teacher in every run (paired '
                'bootstrap over the test texts, Holm-corrected over the comparisons of each run).')
    texts = summary['test_texts'].dropna() if 'test_texts' in summary else pd.Series(dtype=float)
    return (f'[a, b]: 95 % percentile-bootstrap interval over the {int(texts.iloc[0]) if len(texts) else "?"} test '
            f'texts; {SIGNIFICANCE_MARK} = macro-F1 significantly different from the teacher (paired bootstrap, '
            'Holm-corrected over all comparisons of the run; see docs/statistics.md).')


def card_statistics_lines(result: Dict) -> List[str]:
    """How many test texts the metrics rest on, what their intervals are, how the stage compares with the
    teacher, and where its decision thresholds come from."""
    record = result.get('statistics')
    lines = [f'Scored on {result.get("test_texts", "?")} test texts. '
             + (f'Brackets: 95 % percentile-bootstrap interval over those texts ({record["resamples"]:,} resamples).'
                if record else 'No intervals were computed (--bootstrap_resamples 0).')]
    if record and result.get('p_vs_baseline') is not None:
        verdict = 'significantly different from' if result.get('significant_vs_baseline') else 'not significantly different from'
        lines.append(f'Macro-F1 {result.get("f1_macro_delta_vs_baseline", 0):+.4f} against the teacher, 95 % interval '
                     f'[{result["delta_f1_macro_ci_low"]:+.3f}, {result["delta_f1_macro_ci_high"]:+.3f}] (paired '
                     f'bootstrap), p = {result["p_vs_baseline"]:.3g} Holm-corrected over {record["comparisons"]} '
                     f'comparison(s): {verdict} the teacher at alpha {record["significance_level"]:g}.')
    if result.get('threshold_strategy') == 'per_label':
        lines.append('Decision thresholds: per label, the F1-optimal threshold on the validation split (stored in '
                     f'compression_info.json and used by `predict_labels`); macro-F1 at the default threshold would be '
                     f'{result.get("f1_macro_at_default_threshold", float("nan")):.4f}.')
    return [' '.join(lines)]
