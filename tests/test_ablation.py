"""The ablation as one plan of shared stages: each distinct stage runs once, results are reused across
runs, and the summary, plots and model cards are written."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import fast_args, run_cli

ALL = ['baseline', 'kd_only', 'prune_only', 'quant_only', 'kd_prune', 'kd_quant', 'prune_quant', 'kd_prune_quant']


def stage_log(out):
    with open(os.path.join(out, 'stage_log.json'), encoding='utf-8') as fh:
        return json.load(fh)


@pytest.fixture(scope='module')
def ablation(tmp_path_factory, tiny_teacher_dir):
    out = tmp_path_factory.mktemp('ablation')
    cache = tmp_path_factory.mktemp('ablation_cache')
    argv = fast_args(out, run_ablation=True, teacher_path=tiny_teacher_dir, student_layers=2, cache_dir=cache,
                     teacher_epochs=2, epochs=1)
    assert run_cli(argv) == 0
    return str(out), argv


def test_each_distinct_stage_runs_exactly_once(ablation):
    out, _ = ablation
    ran = [e['kind'] for e in stage_log(out) if not e['reused']]
    assert ran.count('teacher') == 1
    assert ran.count('kd') == 1
    assert ran.count('prune') == 2   # teacher pruned, student pruned
    assert ran.count('quant') == 4   # teacher, student, pruned teacher, pruned student
    assert len(ran) == 8


def test_config_and_log_describe_the_whole_plan(ablation):
    out, _ = ablation
    with open(os.path.join(out, 'config.json'), encoding='utf-8') as fh:
        config = json.load(fh)
    assert config['pipelines'] == ALL and config['pipeline'] is None
    assert config['enable_kd'] and config['enable_pruning'] and config['enable_quantization']
    with open(os.path.join(out, 'run.log'), encoding='utf-8') as fh:
        log = fh.read()
    assert 'Ablation: 8 pipelines' in log and 'kd_prune_quant' in log and '[done]' in log


def test_summary_plots_results_and_model_cards(ablation):
    out, _ = ablation
    summary = pd.read_csv(os.path.join(out, 'ablation_summary.csv'))
    assert list(summary['pipeline']) == ALL
    for column in ['f1_macro', 'f1_weighted', 'f1_micro', 'exact_match', 'size_mb', 'compression_ratio', 'params_nonzero',
                   'sparsity_overall', 'latency_ms_p50', 'speedup', 'peak_memory_mb', 'f1_bully', 'f1_spam', 'delta_f1_macro']:
        assert column in summary.columns, column
    base = summary.set_index('pipeline').loc['baseline']
    assert base['delta_f1_macro'] == 0 and base['compression_ratio'] == pytest.approx(1.0)
    assert summary.set_index('pipeline').loc['kd_prune_quant', 'size_mb'] < base['size_mb'] / 3
    markdown = open(os.path.join(out, 'ablation_summary.md'), encoding='utf-8').read()
    assert 'test split hash' in markdown and markdown.count('\n| ') >= 9
    for png in ('f1_vs_size.png', 'f1_vs_latency.png', 'per_label_f1.png'):
        with open(os.path.join(out, png), 'rb') as fh:
            assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
    hashes = set()
    for pipeline in ALL:
        with open(os.path.join(out, 'pipelines', pipeline, 'results_final.json'), encoding='utf-8') as fh:
            results = json.load(fh)
        hashes.add(results['test_split_hash'])
        final = results['stages'][-1]
        card = open(os.path.join(final['model_dir'], 'README.md'), encoding='utf-8').read()
        assert pipeline in card and 'load_compressed_model' in card and 'f1_macro' in card
    assert len(hashes) == 1


def test_second_identical_invocation_trains_nothing(ablation, monkeypatch):
    import transformers
    out, argv = ablation

    def no_training(*args, **kwargs):
        raise AssertionError('training ran although every stage is stored')
    monkeypatch.setattr(transformers.Trainer, 'train', no_training)
    assert run_cli(argv) == 0
    assert all(e['reused'] for e in stage_log(out))
    assert len(pd.read_csv(os.path.join(out, 'ablation_summary.csv'))) == 8


def test_changed_setting_reruns_only_downstream_stages(ablation, tmp_path):
    out, argv = ablation
    argv = argv + ['--prune_sparsity', '0.3', '--output_dir', str(tmp_path / 'changed')]
    assert run_cli(argv) == 0
    ran = sorted(e['kind'] for e in stage_log(str(tmp_path / 'changed')) if not e['reused'])
    assert ran == ['prune', 'prune', 'quant', 'quant']  # two pruned models and their quantized versions


def test_interrupted_stage_is_not_taken_as_stored(tmp_path):
    from research_stages import StageStore
    store = StageStore(str(tmp_path))
    path = store.begin('kd', 'abc')
    open(os.path.join(path, 'model.safetensors'), 'w').close()  # a run killed mid-stage
    assert store.load('kd', 'abc') is None
    store.complete('kd', 'abc', {'linear_roles': {}})
    assert store.load('kd', 'abc').reused


def test_seeds_give_mean_and_std(tmp_path, teacher_checkpoint):
    out = tmp_path / 'seeds'
    argv = fast_args(out, run_ablation=True, ablation_pipelines='baseline,kd_only', teacher_checkpoint=teacher_checkpoint,
                     student_layers=2, cache_dir=tmp_path / 'c', seeds='1,2', epochs=1)
    assert run_cli(argv) == 0
    summary = pd.read_csv(out / 'ablation_summary.csv').set_index('pipeline')
    assert list(summary['runs']) == [2, 2]
    assert summary.loc['baseline', 'f1_macro_std'] == 0  # same checkpoint, same split
    assert '±' in (out / 'ablation_summary.md').read_text(encoding='utf-8')
    ran = [e['kind'] for e in stage_log(str(out)) if not e['reused']]
    assert ran.count('kd') == 2  # one student per seed


def test_pareto_front():
    from research_plots import pareto_front
    cost = np.array([10.0, 5.0, 5.0, 1.0, 8.0])
    quality = np.array([0.9, 0.8, 0.7, 0.5, 0.85])
    assert pareto_front(cost, quality).tolist() == [3, 1, 4, 0]


def test_report_aggregates_a_sweep(tmp_path, teacher_checkpoint):
    from research_report import main as report_main
    for alpha in ('0.3', '0.9'):
        argv = fast_args(tmp_path / f'alpha_{alpha}', pipeline='kd_only', teacher_checkpoint=teacher_checkpoint,
                         student_layers=2, cache_dir=tmp_path / 'c', kd_alpha=alpha, epochs=1)
        assert run_cli(argv) == 0
    assert report_main([str(tmp_path / 'alpha_0.3'), str(tmp_path / 'alpha_0.9'), '--output', str(tmp_path / 'rep')]) == 0
    report = pd.read_csv(tmp_path / 'rep' / 'report.csv')
    assert sorted(report['kd_alpha']) == [0.3, 0.9] and len(report) == 2
    assert (tmp_path / 'rep' / 'f1_vs_kd_alpha.png').exists()


def test_exported_model_uses_this_runs_threshold(ablation, tmp_path):
    from research_inference import load_compressed_model
    _, argv = ablation
    cache = argv[argv.index('--cache_dir') + 1]
    out = tmp_path / 'threshold'
    assert run_cli(fast_args(out, pipeline='quant_only', teacher_path=argv[argv.index('--teacher_path') + 1],
                             student_layers=2, cache_dir=cache, teacher_epochs=2, epochs=1, threshold=0.3)) == 0
    assert all(e['reused'] for e in stage_log(str(out)))
    assert load_compressed_model(str(out / 'stages' / 'quant')).threshold == 0.3
    stored = [os.path.join(cache, 'stages', d) for d in os.listdir(os.path.join(cache, 'stages')) if d.startswith('quant-')]
    assert stored and all(load_compressed_model(d).threshold == 0.5 for d in stored)
    assert '0.3' in (out / 'stages' / 'quant' / 'README.md').read_text(encoding='utf-8')
