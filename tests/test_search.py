"""The budgeted search (--search): bad input refused before any training, the space and its trials, one search
end to end (outputs, reuse through the stage store, search_best/ within the budget), trials that never score the
test split, a killed search that continues, and two processes sharing one study and one stage store."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import research_search
from conftest import ROOT, fast_args, run_cli
from research_inference import load_compressed_model
from research_search_report import bootstrap_interval
from research_search_space import (check_space, choose, corner_choices, default_space, most_compressed_choices,
                                   pipeline_of, trial_settings)
from research_compression_config import parse_compression_arguments

BUDGET_MB = 0.5


def search_args(out, teacher, cache, trials, **extra):
    settings = dict(teacher_path=teacher, student_layers=2, cache_dir=cache, teacher_epochs=2, epochs=1, search=True,
                    search_trials=trials, budget_size_mb=BUDGET_MB, budget_speedup=0.5, no_progress_bars=True)
    return fast_args(out, **{**settings, **extra})


def study_trials(storage, name='research_search'):
    import optuna
    study = optuna.load_study(study_name=name, storage=research_search.open_storage(storage))
    return study.get_trials(deepcopy=False)


def produced_stages(*outs):
    events = []
    for out in outs:
        with open(os.path.join(out, 'stage_log.json'), encoding='utf-8') as fh:
            events += json.load(fh)
    return [f'{e["kind"]}-{e["key"]}' for e in events if not e['reused']]


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 before anything is written or trained
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra, space, message', [
    ({'budget_size_mb': 0}, None, '--budget_size_mb must be positive'),
    ({'budget_speedup': -1}, None, '--budget_speedup must be positive'),
    ({'search_trials': 0}, None, '--search_trials must be at least 1'),
    ({'run_ablation': True}, None, '--search and --run_ablation'),
    ({}, 'kd_alpha: {low: 0.9, high: 0.3}\n', 'must be below high'),
    ({}, 'kd_beta: [1, 2]\n', "unknown setting 'kd_beta'"),
    ({}, 'quant_method: [dynamic, int3]\n', "choice 'int3'"),
    ({}, 'student_layers: [2, 4]\n', 'as many layers as the teacher'),
    ({}, 'kd_alpha: [0.5\n', 'is not valid YAML'),
    ({'search_storage': 'sqlite:////no/such/folder/study.db'}, None, 'cannot be reached'),
])
def test_bad_search_input_exits_2_before_any_training(tmp_path, tiny_teacher_dir, capsys, extra, space, message):
    if space is not None:
        (tmp_path / 'space.yaml').write_text(space, encoding='utf-8')
        extra = {**extra, 'search_space': str(tmp_path / 'space.yaml')}
    out = tmp_path / 'out'
    argv = search_args(out, tiny_teacher_dir, tmp_path / 'cache', 4, **extra)
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / 'cache' / 'stages').exists()


def test_a_search_setting_without_search_is_refused(tmp_path, tiny_teacher_dir, capsys):
    argv = fast_args(tmp_path / 'out', teacher_path=tiny_teacher_dir, budget_size_mb=5)
    assert run_cli(argv) == 2
    assert '--budget_size_mb is a setting of --search' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The space and its trials
# ---------------------------------------------------------------------------------------------

class FixedTrial:
    """Answers suggest_* with the first choice (or the low end), recording what was asked."""
    def __init__(self):
        self.asked = []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return choices[0]

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return low

    def suggest_int(self, name, low, high, log=False):
        self.asked.append(name)
        return low


def test_space_trials_and_corners(tmp_path, tiny_teacher_dir):
    args = parse_compression_arguments(search_args(tmp_path / 'out', tiny_teacher_dir, tmp_path / 'c', 4))
    space = check_space({'kd': [False], 'prune': [True], 'quant': [True, False], 'prune_sparsity': {'low': 0.3, 'high': 0.8},
                         'kd_alpha': [0.1]}, 'test', 4)
    trial = FixedTrial()
    chosen = choose(trial, space, args)
    # KD does not run, so its settings are never sampled; pruning's are
    assert 'kd_alpha' not in trial.asked and 'prune_sparsity' in trial.asked
    assert pipeline_of(chosen) == 'prune_quant'
    settings = trial_settings(args, chosen)
    assert settings.prune_sparsity == 0.3 and settings.quant_method == 'dynamic'
    corners = {pipeline_of(corner_choices(args, p)) for p in
               ('baseline', 'kd_only', 'prune_only', 'quant_only', 'kd_prune', 'kd_quant', 'prune_quant', 'kd_prune_quant')}
    assert len(corners) == 8
    assert corner_choices(args, 'kd_only')['student_layers'] == '2'


def test_the_most_compressed_trial_takes_each_settings_smallest_fastest_end(tmp_path, tiny_teacher_dir):
    args = parse_compression_arguments(search_args(tmp_path / 'out', tiny_teacher_dir, tmp_path / 'c', 4))
    chosen = most_compressed_choices(check_space(default_space(args), 'test', 4), args)
    assert chosen == {'kd': True, 'prune': True, 'quant': True, 'trim_vocab': True, 'student_layers': '1',
                      'kd_method': 'logit', 'kd_alpha': args.kd_alpha, 'kd_temperature': args.kd_temperature,
                      'prune_method': 'structured', 'prune_sparsity': 0.7, 'quant_method': 'dynamic'}
    ranges = check_space({'kd': [False, True], 'prune': [True], 'quant': [True], 'student_layers': {'low': 1, 'high': 3},
                          'prune_sparsity': {'low': 0.2, 'high': 0.6}, 'quant_method': ['fp16', 'int4'],
                          'prune_method': ['magnitude']}, 'test', 4)
    chosen = most_compressed_choices(ranges, args)
    assert (chosen['student_layers'], chosen['prune_sparsity'], chosen['quant_method']) == (1, 0.6, 'int4')
    assert chosen['prune_method'] == 'magnitude' and pipeline_of(chosen) == 'kd_prune_quant'
    # a technique the space does not name keeps --pipeline's choice (here: no quantization)
    no_kd = most_compressed_choices(check_space({'kd': [False], 'prune': [True, False]}, 'test', 4),
                                    args.replace(pipeline='kd_only'))
    assert pipeline_of(no_kd) == 'prune_only' and 'student_layers' not in no_kd and 'quant_method' not in no_kd


def test_bootstrap_interval_brackets_macro_f1_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(200, 3))
    predictions = np.where(rng.random((200, 3)) < 0.8, labels, 1 - labels)
    point = f1_score(labels, predictions, average='macro', zero_division=0)
    low, high = bootstrap_interval(labels, predictions, seed=1)
    assert low < point < high and high - low < 0.2
    assert bootstrap_interval(labels, predictions, seed=1) == (low, high)


# ---------------------------------------------------------------------------------------------
# One search end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def search_run(tmp_path_factory, tiny_teacher_dir):
    out = tmp_path_factory.mktemp('search')
    cache = tmp_path_factory.mktemp('search_cache')
    assert run_cli(search_args(out, tiny_teacher_dir, cache, 10)) == 0
    return str(out)


def test_search_outputs_and_reuse(search_run):
    trials = pd.read_csv(os.path.join(search_run, 'search_trials.csv'))
    assert len(trials) == 10 and (trials['state'] == 'COMPLETE').all()
    assert list(trials['corner'][:8]) == ['baseline', 'kd_only', 'prune_only', 'quant_only', 'kd_prune', 'kd_quant',
                                          'prune_quant', 'kd_prune_quant']
    anchor = trials.iloc[8]     # then the space's most compressed setting
    assert anchor['anchor'] == 'most_compressed' and anchor['description'] == 'kd(L1, logit a0.7 T4, trim) → structured 70 % → int8'
    assert (trials['val_f1_low'] <= trials['val_f1_macro']).all() and (trials['val_f1_macro'] <= trials['val_f1_high']).all()
    assert (trials['feasible'] == ((trials['size_mb'] <= BUDGET_MB) & (trials['speedup'] >= 0.5))).all()
    produced = produced_stages(search_run)
    assert len(produced) == len(set(produced))
    assert sum(s.startswith('teacher-') for s in produced) == 1
    corner_students = {key for keys in trials.loc[:7, 'stage_keys'].dropna() for key in keys.split(';') if key.startswith('kd-')}
    assert len(corner_students) == 1                     # the corners distil one student, once
    log = open(os.path.join(search_run, 'run.log'), encoding='utf-8').read()
    assert '[search] trial 8/10 (#7): kd(L2, logit a0.7 T4) → magnitude 50 % → int8: val macro-F1' in log
    assert '(reused teacher, student, pruned model)' in log
    markdown = open(os.path.join(search_run, 'search_pareto.md'), encoding='utf-8').read()
    assert 'Best feasible of the eight pipelines' in markdown and markdown.count('\n| ') >= 11
    with open(os.path.join(search_run, 'search_pareto.png'), 'rb') as fh:
        assert fh.read(8) == b'\x89PNG\r\n\x1a\n'


def test_search_best_loads_and_meets_the_budget(search_run):
    best = os.path.join(search_run, 'search_best')
    classifier = load_compressed_model(best)
    assert classifier.logits(classifier.tokenizer(['a test'], return_tensors='np')).shape[1] == 5
    with open(os.path.join(best, 'search_result.json'), encoding='utf-8') as fh:
        record = json.load(fh)
    trials = pd.read_csv(os.path.join(search_run, 'search_trials.csv'))
    feasible = trials[trials['feasible'].astype(bool)]
    assert record['validation']['val_f1_macro'] == pytest.approx(feasible['val_f1_macro'].max())
    assert record['test']['best']['size_mb'] <= BUDGET_MB
    assert 'f1_macro_low' in record['test']['teacher'] and os.path.isfile(os.path.join(best, 'README.md'))


# ---------------------------------------------------------------------------------------------
# Never the test split; a killed search continues; two processes share a study and a store
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trials_never_score_the_test_split(tmp_path, tiny_teacher_dir, monkeypatch):
    values = {}
    real = research_search.prepare_data
    for name in ('clean', 'poisoned'):
        if name == 'poisoned':
            def poisoned(*a, **k):
                data = real(*a, **k)
                data.labels[data.test_idx] = 1 - data.labels[data.test_idx]   # every test label wrong
                return data
            monkeypatch.setattr(research_search, 'prepare_data', poisoned)
        out = tmp_path / name
        assert run_cli(search_args(out, tiny_teacher_dir, tmp_path / f'cache_{name}', 4, budget_size_mb=100)) == 0
        trials = pd.read_csv(out / 'search_trials.csv')
        trials = trials[trials['state'] == 'COMPLETE']
        assert len(trials) == 4
        with open(out / 'search_best' / 'search_result.json', encoding='utf-8') as fh:
            test_f1 = json.load(fh)['test']['teacher']['f1_macro']
        values[name] = (trials['val_f1_macro'].tolist(), trials['val_f1_low'].tolist(), test_f1)
    assert values['clean'][:2] == values['poisoned'][:2]
    assert values['clean'][2] != values['poisoned'][2]      # the poison did reach the test split


def cli_process(argv, log_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    log = open(log_path, 'w', encoding='utf-8')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT), log


@pytest.mark.slow
def test_a_killed_search_continues_where_it_stopped(tmp_path, tiny_teacher_dir):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    argv = search_args(out, tiny_teacher_dir, cache, 10)   # the retry is queued behind the eight pipelines
    # Killed after 3 trials, while the 4th (quant_only) runs
    process, log = cli_process(argv, tmp_path / 'first.log')
    try:
        while process.poll() is None and '(quant_only, trial 3)' not in (tmp_path / 'first.log').read_text(encoding='utf-8'):
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        log.close()
    assert run_cli(argv) == 0
    trials = study_trials(str(out / research_search.SEARCH_JOURNAL))
    complete = [t for t in trials if t.state.name == 'COMPLETE']
    assert len(complete) == 10
    assert len({t.user_attrs['owner']['pid'] for t in complete}) == 2    # both processes ran some
    failed = [t for t in trials if t.state.name == 'FAIL']
    assert [t.number for t in failed] == [3]            # killed while it ran: failed, then run again
    assert all(any(r.user_attrs.get('retry_of') == f.number for r in complete) for f in failed)
    log_text = (out / 'run.log').read_text(encoding='utf-8')
    assert '[search] trial 3/10' not in log_text and '[search] trial 10/10' in log_text


@pytest.mark.slow
def test_two_processes_share_one_study_and_one_store(tmp_path, tiny_teacher_dir):
    storage, cache = str(tmp_path / 'study.journal'), tmp_path / 'cache'
    processes = []
    for name in ('a', 'b'):
        processes.append(cli_process(search_args(tmp_path / name, tiny_teacher_dir, cache, 10, search_storage=storage),
                                     tmp_path / f'{name}.log'))
    for process, log in processes:
        assert process.wait(timeout=1200) == 0, (tmp_path / 'a.log').read_text() + (tmp_path / 'b.log').read_text()
        log.close()
    trials = [t for t in study_trials(storage) if t.state.name == 'COMPLETE']
    assert len(trials) >= 10
    assert {t.user_attrs['owner']['pid'] for t in trials} == {p.pid for p, _ in processes}
    produced = produced_stages(str(tmp_path / 'a'), str(tmp_path / 'b'))
    assert len(produced) == len(set(produced))         # no stage produced twice
    assert sum(s.startswith('teacher-') for s in produced) == 1
