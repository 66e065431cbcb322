"""Statistics (research_stats): bootstrap intervals agree with scikit-learn and contain their estimate, paired
tests tell a real difference from none, Holm's correction, tuned thresholds ignore the test split, and end to
end: intervals in the results, an fp16 copy of the teacher that is not significantly different, stored
per-label thresholds used by predict."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from conftest import LABELS, fast_args, run_cli

import research_stats as rs


def synthetic(n, labels=5, seed=0, noise=0.25):
    """Labels with rare positives, scores that track them, predictions at 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.1, 0.4, labels)).astype(int)
    probs = np.clip(0.35 * y + 0.3 + rng.normal(0, noise, (n, labels)), 0, 1)
    return y, (probs >= 0.5).astype(int), probs


def test_metrics_of_the_identity_resample_equal_scikit_learn():
    y, pred, probs = synthetic(300)
    ones = np.ones((1, len(y)), np.float32)
    got = rs.resampled_f1_metrics(y, pred, ones)
    for average in ('macro', 'micro', 'weighted'):
        assert got[f'f1_{average}'][0] == pytest.approx(f1_score(y, pred, average=average, zero_division=0))
    assert got['exact_match'][0] == pytest.approx(accuracy_score(y, pred))
    assert rs.resampled_roc_auc_macro(y, probs, ones)[0] == pytest.approx(
        np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in range(y.shape[1])]))


def test_resampled_metrics_equal_scikit_learn_on_the_drawn_texts():
    y, pred, probs = synthetic(120, seed=3)
    probs = np.round(probs, 1)                      # ties, which ROC-AUC counts one half
    counts = rs.resample_counts(len(y), 5, seed=1)
    f1 = rs.resampled_f1_metrics(y, pred, counts)['f1_macro']
    auc = rs.resampled_roc_auc(y[:, 2], probs[:, 2], counts)
    for b in range(5):
        drawn = np.repeat(np.arange(len(y)), counts[b].astype(int))
        assert f1[b] == pytest.approx(f1_score(y[drawn], pred[drawn], average='macro', zero_division=0))
        assert auc[b] == pytest.approx(roc_auc_score(y[drawn, 2], probs[drawn, 2]))


def test_every_interval_contains_its_point_estimate():
    y, pred, probs = synthetic(400, seed=5)
    counts = rs.resample_counts(len(y), 2000, seed=0)
    fields = rs.metric_intervals(y, pred, probs, counts, LABELS)
    point = rs.resampled_f1_metrics(y, pred, np.ones((1, len(y)), np.float32))
    for metric in rs.SCALAR_METRICS:
        assert fields[f'{metric}_ci_low'] <= point[metric][0] <= fields[f'{metric}_ci_high'], metric
    for j, label in enumerate(LABELS):
        assert fields['per_label'][label]['f1_ci_low'] <= point['per_label_f1'][0, j] <= fields['per_label'][label]['f1_ci_high']
    auc = np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in range(5)])
    assert fields['roc_auc_macro_ci_low'] <= auc <= fields['roc_auc_macro_ci_high']


def test_interval_width_shrinks_as_the_test_set_grows():
    widths = []
    for n in (100, 400, 1600):
        y, pred, probs = synthetic(n, seed=7)
        fields = rs.metric_intervals(y, pred, probs, rs.resample_counts(n, 2000, seed=0), LABELS)
        widths.append(fields['f1_macro_ci_high'] - fields['f1_macro_ci_low'])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)   # width ~ 1 / sqrt(n)


def test_identical_predictions_are_not_significantly_different():
    y, pred, _ = synthetic(300)
    test = rs.paired_difference(y, pred, pred.copy(), rs.resample_counts(len(y), 10000, seed=0))
    assert test['ci_low'] <= 0 <= test['ci_high']
    assert test['p'] >= 0.5
    assert rs.holm_adjusted([test['p']])[0] > 0.05


def test_thirty_percent_of_predictions_flipped_to_wrong_is_significant():
    y, _, _ = synthetic(300)
    good = y.copy()                                  # a model that is right everywhere
    rng = np.random.default_rng(0)
    flipped = good.copy()
    rows = rng.choice(len(y), size=int(0.3 * len(y)), replace=False)
    flipped[rows] = 1 - y[rows]                      # every label of 30 % of the texts wrong
    test = rs.paired_difference(y, good, flipped, rs.resample_counts(len(y), 10000, seed=0))
    assert test['ci_low'] > 0 and test['p'] < 0.001


def test_holm_against_a_hand_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> 0.06
    assert rs.holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rs.holm_adjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert rs.holm_adjusted([]) == []


def test_t_interval_of_between_seed_values():
    from scipy import stats
    got = rs.t_interval([0.40, 0.42, 0.47])
    half = stats.t.ppf(0.975, 2) * np.std([0.40, 0.42, 0.47], ddof=1) / np.sqrt(3)
    assert got['mean'] == pytest.approx(0.43) and got['ci_high'] - got['mean'] == pytest.approx(half)
    assert rs.t_interval([0.4])['ci_low'] is None


def test_tuned_thresholds_maximise_validation_f1_and_ignore_the_test_split():
    y, _, probs = synthetic(400, seed=11)
    tuned = rs.tune_thresholds(y, probs, LABELS, default=0.5, min_positives=5)
    for j, label in enumerate(LABELS):
        best = f1_score(y[:, j], probs[:, j] >= tuned[label], zero_division=0)
        for candidate in np.linspace(0.05, 0.95, 19):
            assert best >= f1_score(y[:, j], probs[:, j] >= candidate, zero_division=0) - 1e-12
    rare = y.copy()
    rare[:, 0] = 0
    rare[:3, 0] = 1                                  # 3 validation positives < 5: keeps the default
    assert rs.tune_thresholds(rare, probs, LABELS, 0.5, 5)['bully'] == 0.5


def test_add_statistics_fields_and_holm_over_the_run():
    y, pred, probs = synthetic(200, seed=2)
    worse = pred.copy()
    worse[:60] = 1 - y[:60]

    def stage(key, p):
        return {'stage_key': key, 'per_label': {label: {'f1': 0.0} for label in LABELS}, rs.PREDICTIONS: (y, p, probs)}
    chains = {'a': [stage('t', pred), stage('same', pred.copy())], 'b': [stage('t', pred), stage('bad', worse)]}
    rs.add_statistics(chains, 2000, seed=0, alpha=0.05)
    same, bad = chains['a'][1], chains['b'][1]
    assert same['significant_vs_baseline'] is False and bad['significant_vs_baseline'] is True
    assert same['statistics']['comparisons'] == 2                # one per stage: its parent is the teacher
    assert bad['p_vs_baseline'] == pytest.approx(min(1, 2 * bad['p_vs_baseline_uncorrected']))
    assert chains['a'][0]['p_vs_baseline'] is None
    assert all(rs.PREDICTIONS not in s for chain in chains.values() for s in chain)
    assert 'f1_ci_low' in bad['per_label']['bully']


# ---------------------------------------------------------------------------------------------
# End to end on the tiny models
# ---------------------------------------------------------------------------------------------

def test_fp16_copy_of_the_teacher_is_not_significantly_different(tmp_path, teacher_checkpoint):
    out = tmp_path / 'out'
    argv = fast_args(out, pipeline='quant_only', quant_method='fp16', teacher_checkpoint=teacher_checkpoint,
                     cache_dir=tmp_path / 'cache', bootstrap_resamples=2000, save_all_stages=True)
    assert run_cli(argv) == 0
    with open(out / 'results_final.json', encoding='utf-8') as fh:
        teacher, quant = json.load(fh)['stages']
    assert quant['significant_vs_baseline'] is False and quant['p_vs_baseline'] >= 0.05
    assert quant['delta_f1_macro_ci_low'] <= 0 <= quant['delta_f1_macro_ci_high']
    for stage in (teacher, quant):
        for metric in ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match'):
            assert stage[f'{metric}_ci_low'] <= stage[metric] <= stage[f'{metric}_ci_high']
    card = (out / 'stages' / 'quant' / 'README.md').read_text(encoding='utf-8')
    assert f'Scored on {quant["test_texts"]} test texts' in card and 'not significantly different' in card


def test_per_label_thresholds_are_tuned_on_validation_stored_and_used_by_predict(tmp_path, teacher_checkpoint):
    from research_inference import load_compressed_model
    from research_inference import main as inference_main
    out = tmp_path / 'out'
    argv = fast_args(out, pipeline='baseline', teacher_checkpoint=teacher_checkpoint, cache_dir=tmp_path / 'cache',
                     threshold_strategy='per_label', min_threshold_positives=2, bootstrap_resamples=1000)
    assert run_cli(argv) == 0
    with open(out / 'results_final.json', encoding='utf-8') as fh:
        stage = json.load(fh)['stages'][0]
    with open(out / 'stages' / 'baseline' / 'compression_info.json', encoding='utf-8') as fh:
        stored = json.load(fh)['thresholds']
    assert stored == stage['thresholds'] and set(stored) == set(LABELS)
    assert any(v != 0.5 for v in stored.values())
    assert 'f1_macro_at_default_threshold' in stage
    model = load_compressed_model(str(out / 'stages' / 'baseline'))
    texts = ['tui ekta boka', 'valo theko']
    probs = model.predict(texts)
    assert model.predict_labels(texts) == [[l for l in LABELS if p[l] >= stored[l]] for p in probs]
    assert inference_main([str(out / 'stages' / 'baseline'), texts[0]]) == 0


def test_changing_test_labels_never_changes_a_tuned_threshold(teacher_checkpoint):
    import copy
    from types import SimpleNamespace
    from conftest import SAMPLE_CSV
    from research_data import prepare_data, tokenized_splits
    from research_eval import evaluate_saved_model
    from research_inference import load_compressed_model
    classifier = load_compressed_model(teacher_checkpoint)
    settings = SimpleNamespace(threshold_strategy='per_label', threshold=0.5, min_threshold_positives=2)
    data = prepare_data(SAMPLE_CSV, 'comment', LABELS, 5, 0, 1.0, 0.1, 42)
    results = []
    for seed in (0, 1):
        changed = copy.deepcopy(data)
        changed.labels[changed.test_idx] = np.random.default_rng(seed).integers(0, 2, (len(data.test_idx), len(LABELS)))
        splits = tokenized_splits(changed, classifier.tokenizer, 32, None)
        results.append(evaluate_saved_model(classifier, teacher_checkpoint, splits, [], settings))
    assert results[0]['f1_macro'] != results[1]['f1_macro']        # the test labels did change the score
    assert results[0]['thresholds'] == results[1]['thresholds']    # and never a threshold


def test_stage_table_and_summary_show_intervals_and_mark_significance():
    from research_results import format_stage_table, summarize_runs, summary_markdown, final_stage_row
    y, pred, probs = synthetic(200, seed=2)
    worse = pred.copy()
    worse[:80] = 1 - y[:80]
    common = {'size_mb': 1.0, 'size_mb_compressed': 1.0, 'params_nonzero': 10, 'sparsity_overall': 0.0,
              'latency_ms_p50': 1.0, 'compression_ratio': 1.0, 'speedup': 1.0, 'exact_match': 0.1, 'f1_weighted': 0.5,
              'f1_micro': 0.5}

    def stage(name, key, p):
        f1 = rs.resampled_f1_metrics(y, p, np.ones((1, len(y)), np.float32))
        return {**common, 'stage': name, 'stage_key': key, 'f1_macro': float(f1['f1_macro'][0]),
                'test_texts': len(y), 'per_label': {label: {'f1': float(f1['per_label_f1'][0, j])} for j, label in enumerate(LABELS)},
                rs.PREDICTIONS: (y, p, probs)}
    chain = rs.add_statistics({'p': [stage('baseline', 't', pred), stage('quant', 'q', worse)]}, 2000, 0, 0.05)['p']
    table = format_stage_table(chain)
    low, high = chain[1]['f1_macro_ci_low'], chain[1]['f1_macro_ci_high']
    assert f'{chain[1]["f1_macro"]:.4f} [{low:.3f}, {high:.3f}]*' in table
    assert '* = macro-F1 significantly different from the teacher' in table
    summary = summarize_runs([final_stage_row('p', chain, LABELS, 'r')])
    markdown = summary_markdown(summary, LABELS, 'fold 0')
    assert f'{chain[1]["f1_macro"]:.4f} [{low:.3f}, {high:.3f}]*' in markdown and '200 test texts' in markdown


@pytest.mark.parametrize('flag, value, named', [('bootstrap_resamples', 10, '--bootstrap_resamples'),
                                                ('significance_level', 0.7, '--significance_level'),
                                                ('min_threshold_positives', 0, '--min_threshold_positives')])
def test_statistics_settings_out_of_range_are_refused(tmp_path, tiny_teacher_dir, capsys, flag, value, named):
    argv = fast_args(tmp_path / 'out', pipeline='baseline', teacher_path=tiny_teacher_dir, **{flag: value})
    assert run_cli(argv) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()      # refused before anything was written
