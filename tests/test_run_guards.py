"""A run's folders are its own and its log survives it: one run per output folder (the second refused,
naming the first), output and cache folders that keep apart, no empty path, no repeated seed, accumulation
that fits an epoch, a forced rebuild that never removes a stage another live run uses, and a run.log that
holds every line printed even after kill -9."""

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, fast_args, run_cli
from research_stage_locks import release_stage_uses
from research_stages import StageStore
from test_bad_input import make_earlier_run, snapshot
from test_store import writer


def refused(capsys, argv, expected):
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and 'Traceback' not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# Output folder against cache folder, empty paths, repeated seeds, accumulation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('where, expected', [
    ('same', 'are the same folder'),
    ('output_inside_cache', 'the output folder lies inside the cache folder'),
    ('cache_in_stages', "the cache folder lies inside 'stages' of the output folder"),
    ('cache_in_logs', "the cache folder lies inside 'logs' of the output folder"),
    ('same_through_a_link', 'are the same folder'),
])
def test_output_and_cache_folders_that_would_touch_each_other_are_refused(tmp_path, capsys, tiny_teacher_dir,
                                                                          where, expected):
    out = tmp_path / 'out'
    make_earlier_run(out)
    before = snapshot(out)
    os.symlink(out, tmp_path / 'link')
    cache = {'same': out, 'output_inside_cache': tmp_path, 'cache_in_stages': out / 'stages' / 'cache',
             'cache_in_logs': out / 'logs' / 'c', 'same_through_a_link': tmp_path / 'link'}[where]
    refused(capsys, fast_args(out, pipeline='baseline', teacher_path=tiny_teacher_dir, cache_dir=cache), expected)
    assert snapshot(out) == before


def test_a_cache_folder_under_a_name_the_archive_leaves_alone_is_accepted(tmp_path, tiny_teacher_dir):
    from research_compression_config import parse_compression_arguments
    args = parse_compression_arguments(fast_args(tmp_path / 'out', pipeline='baseline', teacher_path=tiny_teacher_dir,
                                                 cache_dir=tmp_path / 'out' / 'my_cache'))
    assert args.cache_dir.endswith('my_cache')


@pytest.mark.parametrize('flag', ['cache_dir', 'output_dir', 'dataset_path', 'teacher_path', 'teacher_checkpoint',
                                  'student_path'])
def test_an_empty_path_flag_is_refused(tmp_path, capsys, tiny_teacher_dir, flag, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {'pipeline': 'kd_only', 'teacher_path': tiny_teacher_dir, 'cache_dir': tmp_path / 'cache', flag: ' '}
    out = settings.pop('output_dir', tmp_path / 'out')
    argv = fast_args(out, **settings)
    refused(capsys, argv, f'--{flag} is empty')
    assert sorted(os.listdir(tmp_path)) == (['cache'] if os.path.exists(tmp_path / 'cache') else [])


@pytest.mark.parametrize('seeds', ['42,42', '42,43,42'])
def test_repeated_seeds_are_refused(tmp_path, capsys, tiny_teacher_dir, seeds):
    refused(capsys, fast_args(tmp_path / 'out', pipeline='baseline', teacher_path=tiny_teacher_dir, seeds=seeds,
                              cache_dir=tmp_path / 'cache'), '--seeds repeats 42')


def test_accumulation_beyond_an_epoch_is_refused_with_the_numbers_before_the_output_moves(tmp_path, capsys,
                                                                                           tiny_teacher_dir):
    out = tmp_path / 'out'
    make_earlier_run(out)
    before = snapshot(out)
    err = refused(capsys, fast_args(out, pipeline='baseline', teacher_path=tiny_teacher_dir, batch=16,
                                    gradient_accumulation_steps=1000, cache_dir=tmp_path / 'cache'),
                  '--gradient_accumulation_steps 1000 is more than the')
    batches, texts = map(int, re.search(r'the (\d+) batch\(es\) of --batch 16 that an epoch of the (\d+) training', err).groups())
    assert batches == -(-texts // 16)
    assert snapshot(out) == before and not os.path.exists(tmp_path / 'cache' / 'stages')


def test_accumulation_is_checked_against_the_batches_of_each_process(sample_data=None):
    import numpy as np
    from research_data import PreparedData, check_optimizer_steps
    from research_errors import UsageError
    data = PreparedData(['t'] * 100, np.zeros((100, 1)), ['a'], np.arange(100), np.arange(0), np.arange(0), 0)
    check_optimizer_steps(data, batch=10, processes=1, accumulation=10)          # 10 batches: fits exactly
    with pytest.raises(UsageError, match='more than the 10 batch'):
        check_optimizer_steps(data, batch=10, processes=1, accumulation=11)
    with pytest.raises(UsageError, match='more than the 5 batch.*shared among 2 processes'):
        check_optimizer_steps(data, batch=10, processes=2, accumulation=6)


# ---------------------------------------------------------------------------------------------
# --no_reuse_stages beside a live run that uses the stage
# ---------------------------------------------------------------------------------------------

USER = '''
import hashlib, os, sys, time
sys.path.insert(0, {root!r})
from research_stage_locks import release_stage_uses
from research_stages import StageStore
from test_store import writer
node = StageStore(sys.argv[1]).get_or_run('teacher', 'ab' * 8, writer([]), seed=0)
print('USING', flush=True)
time.sleep(float(sys.argv[2]))      # evaluating the stage
print('INTACT', os.path.exists(os.path.join(node.path, 'model.safetensors')), time.time(), flush=True)
'''


def stored_stage_used_by_another_process(tmp_path, hold_seconds: str):
    """A stored teacher stage, and another process that uses it for `hold_seconds` (this process's own use is
    released, so only the other one holds it): (stage root, that process)."""
    root = str(tmp_path / 'stages')
    StageStore(root).get_or_run('teacher', 'ab' * 8, writer([]), seed=0)
    env = {**os.environ, 'PYTHONPATH': os.path.join(ROOT, 'tests')}
    user = subprocess.Popen([sys.executable, '-c', USER.format(root=ROOT), root, hold_seconds], stdout=subprocess.PIPE,
                            text=True, env=env)
    for line in user.stdout:
        if line.startswith('USING'):
            release_stage_uses()
            return root, user
    raise AssertionError('the other process ended before it used the stage')


def test_a_forced_rebuild_waits_for_the_live_run_that_uses_the_stage(tmp_path, capsys):
    root, user = stored_stage_used_by_another_process(tmp_path, '4')
    calls = []
    capsys.readouterr()
    node = StageStore(root, reuse=False).get_or_run('teacher', 'ab' * 8, writer(calls), seed=0)
    rebuilt_at = time.time()
    line = next(l for l in user.stdout if l.startswith('INTACT')).split()
    user.wait()
    assert line[:2] == ['INTACT', 'True'], line          # nothing was removed under the live run
    assert float(line[2]) <= rebuilt_at and len(calls) == 1 and not node.reused
    assert f'is in use by pid {user.pid}' in capsys.readouterr().out


def test_pruning_the_cache_keeps_a_stage_a_live_run_uses(tmp_path):
    root, user = stored_stage_used_by_another_process(tmp_path, '2')
    assert StageStore(root).remove_unused(0) == []
    user.communicate()
    assert len(StageStore(root).remove_unused(0)) == 1


# ---------------------------------------------------------------------------------------------
# One run per output folder; run.log after kill -9
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_a_busy_output_folder_is_refused_and_the_log_of_a_killed_run_is_complete(
        tmp_path, capsys, tiny_teacher_dir):
    out = tmp_path / 'out'
    argv = fast_args(out, pipeline='baseline', teacher_path=tiny_teacher_dir, cache_dir=tmp_path / 'cache',
                     teacher_epochs=50, early_stopping_patience=50)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv, '--no_progress_bars'],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    printed = []
    try:
        for line in first.stdout:
            printed.append(line.rstrip('\n'))
            if line.startswith('[teacher] fine-tuning'):
                break
        assert printed and printed[-1].startswith('[teacher] fine-tuning'), '\n'.join(printed)
        log_before = open(out / 'run.log', encoding='utf-8').read()
        err = refused(capsys, argv, f"is in use by the run of pid {first.pid} on host")
        assert 'Wait for that run to end, or choose another --output_dir' in err
        assert not os.path.exists(out / 'previous_runs')
        assert open(out / 'run.log', encoding='utf-8').read().startswith(log_before)
        time.sleep(1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    log = open(out / 'run.log', encoding='utf-8').read()
    assert 'COMPRESSION CONFIGURATION' in log and f'Output:   {out}' in log
    for line in printed:
        # transformers' own logging writes to the stderr its handler captured at import, never into run.log
        # (finished runs alike: its load report), so the tool's own lines ([data], [plan], [teacher], ...) are compared
        if line.startswith('[') and not line.startswith('[transformers]'):
            assert re.sub(r'\x1b\[[0-9;]*m', '', line).rstrip() in log, line     # colours dropped in the log
    # the killed run's lock is free: the kernel released it with the process
    from research_output_guard import hold_output_folder, release_output_folder
    hold_output_folder(str(out))
    release_output_folder()


def test_the_durable_log_replays_what_a_terminal_finally_shows_like_the_buffered_one(tmp_path):
    from tqdm import tqdm
    from research_output import TeeToLog, TerminalLines

    def replay(durable):
        path = tmp_path / f'run-{durable}.log'
        with open(path, 'w', encoding='utf-8', newline='') as log:
            screen = TerminalLines(log, durable=durable)
            err = TeeToLog(io.StringIO(), screen)
            print('first line', file=err)
            seen = []
            with tqdm(total=5, file=err, ascii=True, mininterval=0, desc='train') as outer:
                for _ in range(5):
                    with tqdm(total=3, file=err, ascii=True, mininterval=0, position=1, leave=False) as inner:
                        for _ in range(3):
                            inner.update(1)
                    outer.update(1)
                    outer.write("{'loss': 0.5}", file=err)
                    seen.append(path.read_text(encoding='utf-8'))
            print('[eval] done', file=err)
            seen.append(path.read_text(encoding='utf-8'))
            screen.close()
        return path.read_text(encoding='utf-8'), seen

    final, seen = replay(True)
    timing = lambda text: re.sub(r'\[\d\d:\d\d<[^\]]*\]', '[time]', text)     # a bar's elapsed time and rate vary
    assert timing(final) == timing(replay(False)[0])
    assert seen[0].startswith('first line\n') and "{'loss': 0.5}" in seen[0]     # on disk as soon as printed
    assert seen[-1].rstrip().endswith('[eval] done')
