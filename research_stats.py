"""Statistics of a run's comparisons: 95 % bootstrap intervals of every quality metric of a stage, paired
tests of each stage against the baseline teacher and against its parent (Holm-corrected over the run), the
between-seed t interval, and per-label decision thresholds tuned on the validation split. Pure numpy/scipy
(and scikit-learn's precision-recall curve): no models, no files.

How the bootstrap is computed, and why not with `scipy.stats.bootstrap`:
- One set of resamples per test split: B index arrays of n test texts drawn with replacement (seeded), kept
  as a (B, n) matrix of how often each text was drawn. Every stage of the run is scored on the SAME resamples,
  which is what makes the comparison paired (Dror et al. 2018). `scipy.stats.bootstrap` draws its own
  resamples on every call, so two stages scored in two calls would not be paired.
- Every metric here is a function of per-label true-positive / false-positive / false-negative counts (and
  per-text exact-match and Hamming counts), and the count of resample b is (draws of b) @ (per-text 0/1
  matrix): one matrix product scores all B resamples of a stage, instead of B calls to scikit-learn.
- The interval is the percentile interval (Efron 1979; Efron & Tibshirani 1993, ch. 13). BCa would need a
  jackknife over the n texts (n more evaluations per stage) for a correction that is small at these n.
- ROC-AUC is rank-based: on each resample it is computed from the cumulative resampled negative weight below
  each score (ties count one half), O(B n) per label; it uses the first `AUC_RESAMPLES` resamples only
  (recorded as `roc_auc_macro_ci_resamples`), because it costs a sort-order pass per label where F1 costs one
  matrix product.
- Paired test: the bootstrap distribution of the macro-F1 difference d_b on the shared resamples gives its
  95 % interval; the two-sided p-value shifts that distribution to the null (Efron & Tibshirani 1993, 16.4):
  p = (1 + #{b : |d_b - d| >= |d|}) / (B + 1). Holm (1979) corrects the p-values of all comparisons of a run.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats
from sklearn.metrics import precision_recall_curve

CONFIDENCE = 0.95
AUC_RESAMPLES = 2000          # ROC-AUC intervals use the first this many of the shared resamples
_CHUNK = 1000                 # resamples drawn per block (bounds the temporary index array to _CHUNK x n)
_TOLERANCE = 1e-12            # float round-off when comparing resampled differences


# ---------------------------------------------------------------------------------------------
# Resamples: one (B, n) matrix of draw counts per test split, shared by every stage
# ---------------------------------------------------------------------------------------------

def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float32: how often each of the n texts is drawn in each bootstrap resample of n texts
    (seeded; drawn in fixed blocks, so the same seed gives the same resamples)."""
    rng = np.random.default_rng(seed)
    counts = np.empty((resamples, n), dtype=np.float32)
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        counts[start:start + rows] = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n)
    return counts


def percentile_interval(values: np.ndarray, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The 95 % percentile interval of bootstrap values along `axis`."""
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1 - tail], axis=axis)
    return low, high


# ---------------------------------------------------------------------------------------------
# Metrics of every resample at once, from counts
# ---------------------------------------------------------------------------------------------

def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


def resampled_f1_metrics(y_true: np.ndarray, y_pred: np.ndarray, counts: np.ndarray) -> Dict[str, np.ndarray]:
    """F1 macro/micro/weighted, per-label F1 (B, L), exact match and Hamming loss of every resample (rows of
    `counts`); with a single row of ones, the metrics of the test split itself."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float32), np.asarray(y_pred, dtype=np.float32)
    labels = y_true.shape[1]
    per_text = np.hstack([y_true * y_pred, (1 - y_true) * y_pred, y_true * (1 - y_pred),
                          (y_true == y_pred).all(axis=1, keepdims=True), (y_true != y_pred).mean(axis=1, keepdims=True)])
    summed = (counts @ per_text).astype(np.float64)          # (B, 3L + 2)
    tp, fp, fn = summed[:, :labels], summed[:, labels:2 * labels], summed[:, 2 * labels:3 * labels]
    drawn = counts.sum(axis=1)
    f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)
    support = tp + fn
    return {
        'f1_macro': f1.mean(axis=1),
        'f1_micro': _safe_ratio(2 * tp.sum(1), 2 * tp.sum(1) + fp.sum(1) + fn.sum(1)),
        'f1_weighted': _safe_ratio((f1 * support).sum(1), support.sum(1)),
        'exact_match': summed[:, 3 * labels] / drawn,
        'hamming_loss': summed[:, 3 * labels + 1] / drawn,
        'per_label_f1': f1,
    }


def resampled_roc_auc(y_true: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted (resampled) ROC-AUC of one label on every row of `counts`: the chance that a drawn positive
    scores above a drawn negative, ties one half; NaN on a resample without both classes."""
    order = np.argsort(scores, kind='mergesort')
    sorted_scores, positive = scores[order], np.asarray(y_true)[order].astype(bool)
    weights = counts[:, order].astype(np.float64)
    negative_weights = weights * ~positive
    below = np.hstack([np.zeros((len(weights), 1)), np.cumsum(negative_weights, axis=1)])   # exclusive cumsum
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    group = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    ends = np.r_[starts[1:], len(sorted_scores)]
    under = below[:, starts][:, group] + 0.5 * (below[:, ends] - below[:, starts])[:, group]
    pos_weight, neg_weight = (weights * positive).sum(1), negative_weights.sum(1)
    wins = (weights * positive * under).sum(1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where((pos_weight > 0) & (neg_weight > 0), wins / (pos_weight * neg_weight), np.nan)


def resampled_roc_auc_macro(y_true: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro ROC-AUC of every resample over the labels where the test split has both classes (as
    research_eval.quality_metrics computes it), NaN-skipping a label a resample lacks a class of."""
    y_true = np.asarray(y_true)
    defined = [j for j in range(y_true.shape[1]) if 0 < y_true[:, j].sum() < len(y_true)]
    if not defined:
        return np.full(len(counts), np.nan)
    per_label = np.stack([resampled_roc_auc(y_true[:, j], probs[:, j], counts) for j in defined], axis=1)
    with np.errstate(invalid='ignore'):
        return np.nanmean(np.where(np.isnan(per_label).all(1, keepdims=True), 0.0, per_label), axis=1)


# ---------------------------------------------------------------------------------------------
# Intervals of one stage, paired comparisons, Holm
# ---------------------------------------------------------------------------------------------

SCALAR_METRICS = ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss')


def metric_intervals(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, counts: np.ndarray,
                     label_names: Sequence[str]) -> Dict:
    """`<metric>_ci_low` / `_ci_high` of every scalar quality metric and ROC-AUC macro, and per label
    `f1_ci_low` / `f1_ci_high` (under 'per_label'), over the resamples in `counts`."""
    resampled = resampled_f1_metrics(y_true, y_pred, counts)
    fields = {}
    for metric in SCALAR_METRICS:
        low, high = percentile_interval(resampled[metric])
        fields[f'{metric}_ci_low'], fields[f'{metric}_ci_high'] = float(low), float(high)
    low, high = percentile_interval(resampled['per_label_f1'])
    fields['per_label'] = {name: {'f1_ci_low': float(low[j]), 'f1_ci_high': float(high[j])}
                           for j, name in enumerate(label_names)}
    auc = resampled_roc_auc_macro(y_true, probs, counts[:AUC_RESAMPLES])
    auc = auc[~np.isnan(auc)]
    fields['roc_auc_macro_ci_low'], fields['roc_auc_macro_ci_high'] = (
        (float(v) for v in percentile_interval(auc)) if len(auc) else (None, None))
    fields['roc_auc_macro_ci_resamples'] = int(len(auc))
    return fields


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, counts: np.ndarray) -> Dict:
    """Macro-F1 of `pred_a` minus that of `pred_b` on the same texts: the observed difference, its 95 %
    paired-bootstrap interval and the two-sided p-value of no difference (the shifted bootstrap, see the
    module docstring)."""
    observed = (resampled_f1_metrics(y_true, pred_a, np.ones((1, len(y_true)), np.float32))['f1_macro']
                - resampled_f1_metrics(y_true, pred_b, np.ones((1, len(y_true)), np.float32))['f1_macro'])[0]
    resampled = (resampled_f1_metrics(y_true, pred_a, counts)['f1_macro']
                 - resampled_f1_metrics(y_true, pred_b, counts)['f1_macro'])
    low, high = percentile_interval(resampled)
    extreme = np.count_nonzero(np.abs(resampled - observed) >= abs(observed) - _TOLERANCE)
    return {'delta': float(observed), 'ci_low': float(low), 'ci_high': float(high),
            'p': float((1 + extreme) / (len(resampled) + 1))}


def holm_adjusted(p_values: Sequence[float]) -> List[float]:
    """Holm (1979) step-down adjusted p-values, in the input order: the i-th smallest of m is multiplied by
    (m - i + 1), made non-decreasing, capped at 1. Rejecting where adjusted p <= alpha controls the
    family-wise error rate at alpha."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind='mergesort')
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled) if len(p) else scaled
    return adjusted.tolist()


def t_interval(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean, sample std and the 95 % Student-t interval of the mean of between-seed values (None below 2)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(values) < 2:
        mean = float(values.mean()) if len(values) else None
        return {'mean': mean, 'std': None, 'ci_low': None, 'ci_high': None}
    mean, std = float(values.mean()), float(values.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * std / np.sqrt(len(values))
    return {'mean': mean, 'std': std, 'ci_low': mean - half, 'ci_high': mean + half}


# ---------------------------------------------------------------------------------------------
# Per-label thresholds, tuned on validation
# ---------------------------------------------------------------------------------------------

def tune_thresholds(y_val: np.ndarray, probs_val: np.ndarray, label_names: Sequence[str], default: float,
                    min_positives: int) -> Dict[str, float]:
    """Per label, the threshold that maximises that label's F1 on the validation split, searched over its
    precision-recall curve (sklearn.metrics.precision_recall_curve: every distinct score is a candidate);
    a label with fewer than `min_positives` validation positives keeps `default`. The F1-optimal threshold
    of a calibrated classifier is half its best F1 (Lipton, Elkan & Narayanaswamy 2014), often far below 0.5
    for rare labels. Only validation data enters: the test split never moves a threshold."""
    y_val = np.asarray(y_val).astype(int)
    thresholds = {}
    for j, name in enumerate(label_names):
        if y_val[:, j].sum() < min_positives:
            thresholds[name] = float(default)
            continue
        precision, recall, candidates = precision_recall_curve(y_val[:, j], probs_val[:, j])
        f1 = _safe_ratio(2 * precision[:-1] * recall[:-1], precision[:-1] + recall[:-1])
        thresholds[name] = float(candidates[int(np.argmax(f1))])
    return thresholds


def threshold_vector(thresholds: Dict[str, float], label_names: Sequence[str]) -> np.ndarray:
    return np.asarray([thresholds[name] for name in label_names], dtype=float)


# ---------------------------------------------------------------------------------------------
# The statistics of a run: every distinct stage's intervals, each stage against the baseline and its parent
# ---------------------------------------------------------------------------------------------

# (y_true, y_pred, probs) of the test split a stage's evaluation leaves in its result for the statistics;
# add_statistics removes it (it is never written).
PREDICTIONS = 'test_predictions'


def comparison_pairs(chains: Dict[str, List[Dict]]) -> List[Tuple[str, str]]:
    """The distinct (stage key, other stage key) comparisons of a run: each stage against its chain's
    baseline teacher and against its parent (the first stage after the teacher has one comparison: its
    parent is the teacher)."""
    pairs = []
    for chain in chains.values():
        for parent, stage in zip(chain, chain[1:]):
            for other in (chain[0], parent):
                pair = (stage['stage_key'], other['stage_key'])
                if pair[0] != pair[1] and pair not in pairs:
                    pairs.append(pair)
    return pairs


def run_comparisons(stages: Dict[str, Dict], pairs: List[Tuple[str, str]], counts: np.ndarray) -> Dict:
    """Paired differences of every pair, with Holm-adjusted p-values over all of them ('p_holm')."""
    tests = {}
    for a, b in pairs:
        y_true, pred_a, _ = stages[a][PREDICTIONS]
        tests[(a, b)] = paired_difference(y_true, pred_a, stages[b][PREDICTIONS][1], counts)
    for pair, adjusted in zip(tests, holm_adjusted([t['p'] for t in tests.values()])):
        tests[pair]['p_holm'] = adjusted
    return tests


def comparison_fields(stage: Dict, baseline: Dict, parent: Optional[Dict], tests: Dict, alpha: float) -> Dict:
    """The result fields of one stage's two comparisons (None for the baseline itself)."""
    fields = {}
    for name, other in (('baseline', baseline), ('parent', parent)):
        test = tests.get((stage['stage_key'], other['stage_key'])) if other is not None else None
        suffix = '' if name == 'baseline' else '_vs_parent'
        fields.update({f'delta_f1_macro{suffix}_ci_low': test and test['ci_low'],
                       f'delta_f1_macro{suffix}_ci_high': test and test['ci_high'],
                       f'p_vs_{name}': test and test['p_holm'], f'p_vs_{name}_uncorrected': test and test['p'],
                       f'significant_vs_{name}': None if test is None else bool(test['p_holm'] <= alpha)})
    return fields


def add_statistics(chains: Dict[str, List[Dict]], resamples: int, seed: int, alpha: float) -> Dict[str, List[Dict]]:
    """Add to every stage of a run ({pipeline: [stage results in chain order]}, each holding PREDICTIONS and
    its 'stage_key') its 95 % bootstrap intervals and its paired comparisons with the baseline teacher and its
    parent, Holm-corrected over all comparisons of the run; `resamples` 0 adds nothing. Every stage is scored
    on the same `resamples` resamples of the test texts (seeded with `seed`). Removes PREDICTIONS."""
    stages = {s['stage_key']: s for chain in chains.values() for s in chain}
    if resamples > 0 and stages:
        n = len(next(iter(stages.values()))[PREDICTIONS][0])
        counts = resample_counts(n, resamples, seed)
        intervals = {key: metric_intervals(*s[PREDICTIONS], counts, list(s['per_label'])) for key, s in stages.items()}
        tests = run_comparisons(stages, comparison_pairs(chains), counts)
        record = {'resamples': resamples, 'seed': seed, 'test_texts': n, 'confidence': CONFIDENCE,
                  'significance_level': alpha, 'comparisons': len(tests), 'roc_auc_resamples': min(resamples, AUC_RESAMPLES),
                  'interval': 'percentile bootstrap over test texts', 'test': 'paired bootstrap of the macro-F1 '
                  'difference, two-sided, Holm-corrected over the comparisons of the run'}
        for chain in chains.values():
            for i, stage in enumerate(chain):
                found = intervals[stage['stage_key']]
                stage.update({k: v for k, v in found.items() if k != 'per_label'})
                for label, values in found['per_label'].items():
                    stage['per_label'][label] = {**stage['per_label'][label], **values}
                stage.update(comparison_fields(stage, chain[0], chain[i - 1] if i else None, tests, alpha))
                stage['statistics'] = record
    for chain in chains.values():
        for stage in chain:
            stage.pop(PREDICTIONS, None)
    return chains


# ---------------------------------------------------------------------------------------------
# How a number and its interval are shown (stage table, ablation summary, model card)
# ---------------------------------------------------------------------------------------------

SIGNIFICANCE_MARK = '*'


def with_interval(value, low, high, spec: str = '.4f', interval_spec: str = '.3f') -> str:
    """'0.4615 [0.431, 0.492]' (just the value when there is no interval; '-' when there is no value)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '-'
    text = format(value, spec)
    if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
        text += f' [{format(low, interval_spec)}, {format(high, interval_spec)}]'
    return text


def significance_mark(stage: Dict) -> str:
    """'*' when the stage is significantly different from the teacher (paired test, Holm-corrected)."""
    return SIGNIFICANCE_MARK if stage.get('significant_vs_baseline') else ''


def significance_legend(record: Optional[Dict]) -> str:
    """The legend line of the mark and the intervals, from a stage's 'statistics' record."""
    if not record:
        return 'No intervals: statistics were off (--bootstrap_resamples 0).'
    return (f'[a, b]: 95 % percentile-bootstrap interval over the {record["test_texts"]} test texts '
            f'({record["resamples"]:,} resamples); {SIGNIFICANCE_MARK} = macro-F1 significantly different from the '
            f'teacher (paired bootstrap, Holm-corrected over {record["comparisons"]} comparison(s), alpha '
            f'{record["significance_level"]:g}).')
