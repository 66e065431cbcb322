"""The sweep aggregator (python research_report.py DIRS --output OUT) x {mixed pipelines, mixed label sets,
truncated results, the same folder twice, output is a file}: a report or exit 2 with one paragraph, never a
traceback; only settings that change results are listed as varying; latencies of separate runs are marked
as not comparable while speed-ups (each against its own run's teacher) are."""

import json
import os

import pandas as pd
import pytest

from conftest import fast_args, run_cli
# Imported at collection, not under a test's capsys: transformers' log handler keeps the stderr it first saw
from research_report import main as report_main

LABELS = ['bully', 'threat']


def stage(name, f1, latency, speedup=1.0, labels=LABELS):
    return {'stage': name, 'f1_macro': f1, 'f1_weighted': f1, 'f1_micro': f1, 'exact_match': 0.5, 'size_mb': 4.0,
            'size_mb_compressed': 3.0, 'compression_ratio': 1.0, 'compression_ratio_compressed': 1.0,
            'params_nonzero': 1000, 'sparsity_overall': 0.0, 'latency_ms_p50': latency, 'speedup': speedup,
            'speedup_iqr': 0.1, 'peak_memory_mb': 100.0, 'per_label': {label: {'f1': f1} for label in labels}}


def fake_run(folder, pipeline='kd_only', labels=LABELS, teacher_ms=20.0, student_ms=10.0, **settings):
    """A finished run's folder: config.json and results_final.json (teacher, then the final stage)."""
    os.makedirs(folder, exist_ok=True)
    config = {'tool': 'research_compression', 'pipeline': pipeline, 'output_dir': str(folder),
              'cache_dir': str(folder) + '_cache', 'label_columns': labels, 'kd_alpha': 0.5, **settings}
    results = {'pipeline': pipeline, 'fold': 0, 'train_seed': 42, 'test_split_hash': 'abc',
               'stages': [stage('baseline', 0.6, teacher_ms, 1.0, labels),
                          stage('final', 0.5, student_ms, teacher_ms / student_ms, labels)]}
    with open(os.path.join(folder, 'config.json'), 'w') as fh:
        json.dump(config, fh)
    with open(os.path.join(folder, 'results_final.json'), 'w') as fh:
        json.dump(results, fh)
    return str(folder)


def report(capsys, *argv):
    code = report_main([str(a) for a in argv])
    return code, capsys.readouterr()


def assert_refused(code, captured, *fragments):
    assert code == 2, captured.err
    err = captured.err
    assert 'Traceback' not in err and '\n\n' not in err.strip() and err.startswith('error: '), err
    for fragment in fragments:
        assert fragment in err, err


def test_runs_of_different_pipelines_make_one_report(tmp_path, capsys):
    runs = [fake_run(tmp_path / 'a', 'kd_only'), fake_run(tmp_path / 'b', 'quant_only')]
    code, captured = report(capsys, *runs, '--output', tmp_path / 'rep')
    assert code == 0, captured.err
    frame = pd.read_csv(tmp_path / 'rep' / 'report.csv')
    assert frame['pipeline'].tolist() == ['kd_only', 'quant_only']


def test_paths_and_other_settings_that_change_no_result_are_not_varying(tmp_path, capsys):
    runs = [fake_run(tmp_path / 'a', kd_alpha=0.3, report_to=['none'], author_name='x'),
            fake_run(tmp_path / 'b', kd_alpha=0.9, report_to=['tensorboard'], author_name='y')]
    code, captured = report(capsys, *runs, '--output', tmp_path / 'rep')
    assert code == 0
    assert 'varying settings: kd_alpha;' in captured.out            # not cache_dir, output_dir, report_to, author


def test_settings_that_change_a_score_or_a_measurement_but_no_stage_are_varying(tmp_path, capsys):
    runs = [fake_run(tmp_path / 'a', threshold=0.5, latency_threads=1),
            fake_run(tmp_path / 'b', threshold=0.3, latency_threads=4)]
    code, captured = report(capsys, *runs, '--output', tmp_path / 'rep')
    assert code == 0 and 'varying settings: latency_threads, threshold;' in captured.out


def test_runs_of_different_label_sets_are_refused(tmp_path, capsys):
    runs = [fake_run(tmp_path / 'a'), fake_run(tmp_path / 'b', labels=['bully', 'spam'])]
    assert_refused(*report(capsys, *runs, '--output', tmp_path / 'rep'), 'different label sets', 'bully, spam',
                   'one --label_columns set at a time')
    assert not (tmp_path / 'rep').exists()


@pytest.mark.parametrize('damage, expected', [
    (lambda text: text[:len(text) // 2], 'cannot be read (JSONDecodeError'),       # cut short
    (lambda text: '', 'cannot be read (JSONDecodeError'),                            # empty
    (lambda text: '[1, 2]', 'is not a results file of research_main.py'),          # valid JSON, not results
    (lambda text: json.dumps({**json.loads(text), 'stages': []}), 'is not a results file'),
], ids=['truncated', 'empty', 'not_an_object', 'no_stages'])
def test_a_damaged_results_file_is_refused_by_name(tmp_path, capsys, damage, expected):
    runs = [fake_run(tmp_path / 'a'), fake_run(tmp_path / 'b')]
    path = tmp_path / 'b' / 'results_final.json'
    path.write_text(damage(path.read_text()))
    assert_refused(*report(capsys, *runs, '--output', tmp_path / 'rep'), str(path), expected, 'leave its folder out')


def test_a_damaged_config_of_a_run_is_refused_by_name(tmp_path, capsys):
    runs = [fake_run(tmp_path / 'a'), fake_run(tmp_path / 'b')]
    (tmp_path / 'a' / 'config.json').write_text('{"tool": "resea')
    assert_refused(*report(capsys, *runs, '--output', tmp_path / 'rep'), str(tmp_path / 'a' / 'config.json'))


def test_a_folder_given_twice_counts_once(tmp_path, capsys):
    run = fake_run(tmp_path / 'sweep' / 'a')
    fake_run(tmp_path / 'sweep' / 'b', kd_alpha=0.9)
    code, captured = report(capsys, run, run, tmp_path / 'sweep', os.path.join(run, 'results_final.json'),
                            '--output', tmp_path / 'rep')
    assert code == 0
    assert len(pd.read_csv(tmp_path / 'rep' / 'report.csv')) == 2 and '\n2 runs;' in captured.out


@pytest.mark.parametrize('where', ['file', 'below_a_file'])
def test_an_output_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys, where):
    run = fake_run(tmp_path / 'a')
    (tmp_path / 'taken').write_text('precious')
    output = tmp_path / 'taken' if where == 'file' else tmp_path / 'taken' / 'rep'
    assert_refused(*report(capsys, run, '--output', output), f"--output '{output}'")
    assert (tmp_path / 'taken').read_text() == 'precious'


@pytest.mark.parametrize('paths, expected', [(['nowhere'], "'{t}/nowhere' does not exist"),
                                             (['empty'], 'No results_final.json found')], ids=['missing', 'empty'])
def test_paths_without_results_are_refused_with_exit_2(tmp_path, capsys, paths, expected):
    (tmp_path / 'empty').mkdir()
    assert_refused(*report(capsys, *[tmp_path / p for p in paths], '--output', tmp_path / 'rep'),
                   expected.format(t=tmp_path))


def test_latencies_of_separate_runs_are_marked_not_comparable_and_speedups_are_each_against_its_own_teacher(tmp_path, capsys):
    """Identical students timed in two runs at 12.2 and 21.4 ms: the teachers (24.4 and 42.8 ms) say why."""
    runs = [fake_run(tmp_path / 'a', teacher_ms=24.4, student_ms=12.2),
            fake_run(tmp_path / 'b', teacher_ms=42.8, student_ms=21.4, kd_alpha=0.9)]
    code, captured = report(capsys, *runs, '--output', tmp_path / 'rep')
    assert code == 0
    frame = pd.read_csv(tmp_path / 'rep' / 'report.csv')
    assert frame['speedup'].tolist() == [2.0, 2.0]
    assert frame['teacher_latency_ms_p50'].tolist() == [24.4, 42.8] and frame['latency_group'].tolist() == ['A', 'B']
    markdown = (tmp_path / 'rep' / 'report.md').read_text()
    assert 'NOT comparable between rows of different `latency_group`' in markdown


def test_pipelines_of_one_run_are_one_latency_group(tmp_path, capsys):
    """An ablation's pipelines were timed side by side in one run: their latencies compare, nothing is marked."""
    run = tmp_path / 'ablation'
    fake_run(run)
    for pipeline in ('kd_only', 'quant_only'):
        folder = run / 'pipelines' / pipeline
        fake_run(folder, pipeline)
        os.remove(folder / 'config.json')            # the ablation's config.json is the run folder's
    code, captured = report(capsys, run / 'pipelines', '--output', tmp_path / 'rep')
    assert code == 0
    assert set(pd.read_csv(tmp_path / 'rep' / 'report.csv')['latency_group']) == {'A'}
    assert 'NOT comparable' not in (tmp_path / 'rep' / 'report.md').read_text()


@pytest.mark.slow
def test_a_real_sweep_across_pipelines_and_cache_folders(tmp_path, capsys, teacher_checkpoint):
    """Two real runs, of different pipelines and each with its own --cache_dir (the ValueError of issue 21)."""
    for pipeline in ('baseline', 'quant_only'):
        assert run_cli(fast_args(tmp_path / pipeline, pipeline=pipeline, teacher_checkpoint=teacher_checkpoint,
                                 cache_dir=tmp_path / f'cache_{pipeline}')) == 0
    code, captured = report(capsys, tmp_path / 'baseline', tmp_path / 'quant_only', '--output', tmp_path / 'rep')
    assert code == 0, captured.err
    assert 'cache_dir' not in captured.out.split('varying settings:')[1]
    assert sorted(pd.read_csv(tmp_path / 'rep' / 'report.csv')['pipeline']) == ['baseline', 'quant_only']
