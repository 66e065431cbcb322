"""Where users run it: --report_to (TensorBoard events that hold the KD terms) and a run.log without
progress-bar debris."""

import io
import json
import os
import re

import pytest

from conftest import fast_args, run_cli

KD_TERMS = ['kd_labels', 'kd_logit', 'kd_hidden', 'kd_attention']


@pytest.fixture(scope='module')
def hub_run(tmp_path_factory, teacher_checkpoint):
    """kd_prune_quant with every stage saved, TensorBoard reporting and progress bars on (pytest's captured
    stderr is no terminal, as in a notebook or a redirected log)."""
    out = tmp_path_factory.mktemp('hub_run')
    argv = fast_args(out, pipeline='kd_prune_quant', teacher_checkpoint=teacher_checkpoint, student_layers=2,
                     kd_method='multi_level', cache_dir=tmp_path_factory.mktemp('hub_cache'), save_all_stages=True,
                     report_to='tensorboard')
    assert run_cli(argv) == 0
    with open(os.path.join(out, 'results_final.json'), encoding='utf-8') as fh:
        return str(out), json.load(fh)


def stage(results, name):
    return next(s for s in results['stages'] if s['stage'] == name)


# ---------------------------------------------------------------------------------------------
# --report_to
# ---------------------------------------------------------------------------------------------

def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_tensorboard_events_hold_each_kd_term_under_output_logs(hub_run):
    out, results = hub_run
    kd_logs = os.path.join(out, 'logs', f'kd-{stage(results, "kd")["stage_key"]}')
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(kd_logs))
    logged = scalars(kd_logs)
    for term in KD_TERMS:
        assert f'train/{term}' in logged, sorted(logged)
    assert 'eval/f1_macro' in logged and 'train/learning_rate' in logged
    # the weighted terms add up to the logged training loss, epoch by epoch
    for i, (step, loss) in enumerate(logged['train/loss']):
        total = sum(logged[f'train/{term}'][i][1] for term in KD_TERMS)
        assert logged['train/kd_logit'][i][0] == step and total == pytest.approx(loss, rel=2e-3, abs=2e-3)
    # fine-tuning after pruning reports too (no KD terms there); the teacher checkpoint trained nothing
    prune_logs = scalars(os.path.join(out, 'logs', f'prune-{stage(results, "prune")["stage_key"]}'))
    assert 'train/loss' in prune_logs and 'train/kd_logit' not in prune_logs
    assert sorted(os.listdir(os.path.join(out, 'logs'))) == sorted(
        f'{s}-{stage(results, s)["stage_key"]}' for s in ('kd', 'prune'))


def test_report_to_refuses_an_unknown_or_missing_integration_before_anything(tmp_path, capsys, monkeypatch,
                                                                             tiny_teacher_dir):
    import research_training
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=2,
                     cache_dir=tmp_path / 'cache', report_to='tensorbored')
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert 'tensorbored' in err and 'tensorboard' in err.split('Choose', 1)[1] and 'wandb' in err
    monkeypatch.setattr(research_training, 'get_available_reporting_integrations', lambda: [])
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=2,
                     cache_dir=tmp_path / 'cache', report_to='none,wandb')
    assert run_cli(argv) == 2
    assert 'pip install wandb' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_report_to_is_no_part_of_a_stage_identity():
    from research_compression_config import STAGE_IDENTITY
    settings = {name for names in STAGE_IDENTITY.values() for name in names}
    assert not settings & {'report_to', 'progress_bars'}


# ---------------------------------------------------------------------------------------------
# run.log
# ---------------------------------------------------------------------------------------------

def test_run_log_holds_the_final_state_of_progress_bars_and_no_control_codes(hub_run):
    out, _ = hub_run
    log = open(os.path.join(out, 'run.log'), encoding='utf-8', newline='').read()
    assert '\r' not in log and '\x1b' not in log
    assert "'kd_logit'" in log and '[done]' in log
    bars = [line for line in log.splitlines() if '%|' in line]
    assert bars and all(re.search(r'\d+%\|', line) for line in bars)


def test_run_log_replays_what_a_terminal_finally_shows(tmp_path):
    from tqdm import tqdm
    from research_report import TeeToLog, TerminalLines
    terminal = io.StringIO()
    path = tmp_path / 'run.log'
    with open(path, 'w', encoding='utf-8', newline='') as log:
        screen = TerminalLines(log)
        out, err = TeeToLog(terminal, screen), TeeToLog(terminal, screen)
        out.write('\x1b[1m\x1b[31merror:\x1b[0m in colour\n')
        with tqdm(total=5, file=err, ascii=True, mininterval=0, desc='train') as outer:
            for _ in range(5):
                # a nested bar: drawn one row down, then the cursor goes back up (\x1b[A); cleared when done
                with tqdm(total=3, file=err, ascii=True, mininterval=0, position=1, leave=False, desc='eval') as inner:
                    for _ in range(3):
                        inner.update(1)
                outer.update(1)
                outer.write("{'loss': 0.5}", file=err)   # tqdm clears the bar, prints, redraws it
        print('[eval] done', file=out)
        print(file=out)
        out.write('windows line\r\n')
        out.write('\r 50%|#####     |\r100%|##########| done')   # a bar that never printed its newline
        screen.close()
    assert '\r' in terminal.getvalue() and '\x1b[A' in terminal.getvalue()   # the terminal gets everything
    lines = path.read_text(encoding='utf-8').split('\n')
    assert lines[:6] == ['error: in colour'] + ["{'loss': 0.5}"] * 5
    assert re.fullmatch(r'train: 100%\|#+\| 5/5 \[.*\]', lines[6])
    assert lines[7:] == ['[eval] done', '', 'windows line', '100%|##########| done', '']


def test_no_progress_bars_silences_every_library():
    import datasets
    from transformers.utils import logging as transformers_logging
    from research_report import show_progress_bars
    try:
        show_progress_bars(False)
        assert not transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled() is False
    finally:
        show_progress_bars(True)
    assert transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
