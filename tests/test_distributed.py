"""Data-parallel runs through torchrun (two CPU processes, gloo), refusal of several GPUs under plain python,
and resuming an interrupted training from its last Trainer checkpoint."""

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import TrainerCallback

from conftest import ROOT, fast_args, run_cli


# ---------------------------------------------------------------------------------------------
# torchrun: two processes, one output folder, every stage produced once
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_with_two_processes_runs_kd_prune_quant_once(tmp_path, tiny_teacher_dir):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    argv = fast_args(out, pipeline='kd_prune_quant', kd_method='multi_level', teacher_path=tiny_teacher_dir,
                     student_layers=2, cache_dir=cache, teacher_epochs=1, epochs=1, fine_tune_epochs=1,
                     no_progress_bars=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    started = time.time()
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           os.path.join(ROOT, 'research_main.py'), *argv],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=400)
    seconds = time.time() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f'torchrun, 2 processes: {seconds:.0f} s')

    # One output folder, written by the main process only: nothing archived by a second process
    assert not (out / 'previous_runs').exists()
    assert proc.stdout.count('COMPRESSION CONFIGURATION') == 1          # the configuration printed once
    assert proc.stdout.count('[teacher] fine-tuning') == 1
    with open(out / 'config.json', encoding='utf-8') as fh:
        assert json.load(fh)['data_parallel_processes'] == 2
    with open(out / 'stage_log.json', encoding='utf-8') as fh:
        events = json.load(fh)
    assert [e['kind'] for e in events] == ['teacher', 'kd', 'prune', 'quant']   # each stage produced once
    assert not any(e['reused'] for e in events)
    stored = sorted(os.path.basename(p).split('-')[0] for p in glob.glob(str(cache / 'stages' / '*-*')))
    assert stored == ['kd', 'prune', 'quant', 'teacher']                 # no scratch or work folder left
    assert not glob.glob(str(cache / 'stages' / '*' / 'work'))
    with open(out / 'run.log', encoding='utf-8') as fh:
        log = fh.read()
    assert 'Parallel: 2 processes (DDP)' in log

    # A second run on the same store: the stored teacher is reused by every process; structured pruning (scored
    # by each process alike) and QAT are trained by both processes together
    second = fast_args(tmp_path / 'second', pipeline='prune_quant', prune_method='structured', quant_method='qat',
                       calibration_samples=32, teacher_path=tiny_teacher_dir, cache_dir=cache, teacher_epochs=1,
                       fine_tune_epochs=1, no_progress_bars=True)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           os.path.join(ROOT, 'research_main.py'), *second],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(tmp_path / 'second' / 'stage_log.json', encoding='utf-8') as fh:
        assert [(e['kind'], e['reused']) for e in json.load(fh)] == [('teacher', True), ('prune', False), ('quant', False)]
    with open(tmp_path / 'second' / 'results_final.json', encoding='utf-8') as fh:
        pruned = json.load(fh)['stages'][1]
    assert pruned['params_total'] < pruned['params_total_before_pruning']

    # The final model loads and predicts
    from research_inference import load_compressed_model
    predictions = load_compressed_model(str(out / 'stages' / 'quant')).predict(['তুই একটা বেয়াদব'])
    assert len(predictions) == 1 and all(0.0 <= p <= 1.0 for p in predictions[0].values())

    # Scored on the test split a one-process run of the same data settings scores on
    assert run_cli(fast_args(tmp_path / 'single', pipeline='baseline', teacher_path=tiny_teacher_dir,
                             cache_dir=tmp_path / 'cache1', teacher_epochs=1)) == 0
    with open(out / 'results_final.json', encoding='utf-8') as fh, \
            open(tmp_path / 'single' / 'results_final.json', encoding='utf-8') as single:
        assert json.load(fh)['test_split_hash'] == json.load(single)['test_split_hash']


# ---------------------------------------------------------------------------------------------
# Several GPUs under plain python: refused, saying how to launch
# ---------------------------------------------------------------------------------------------

def test_two_gpus_under_plain_python_are_refused_with_the_torchrun_line(tmp_path, capsys, monkeypatch):
    """(No GPU here: the two GPUs are a mock of what torch reports.)"""
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    code = run_cli(fast_args(tmp_path / 'out', pipeline='baseline', teacher_path=str(tmp_path / 'unused'),
                             cache_dir=tmp_path / 'cache'))
    assert code == 2
    err = capsys.readouterr().err
    assert '2 CUDA GPUs are visible to a plain `python` run' in err
    assert 'torchrun --standalone --nproc_per_node 2 research_main.py' in err
    assert 'accelerate launch --multi_gpu --num_processes 2' in err and 'CUDA_VISIBLE_DEVICES=0' in err
    assert not (tmp_path / 'out').exists()


def test_under_a_launcher_the_identity_records_the_process_count(tmp_path, monkeypatch):
    """Several processes train with a larger effective batch: another stage than a one-process run's."""
    from research_compression_config import parse_compression_arguments, stage_identity
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', cache_dir=tmp_path / 'cache')
    single = parse_compression_arguments(argv)
    assert single.data_parallel_processes == 1 and stage_identity(single, 'kd')['data_parallel_processes'] == 1
    monkeypatch.setenv('WORLD_SIZE', '2')
    double = parse_compression_arguments(argv)
    assert stage_identity(double, 'kd')['data_parallel_processes'] == 2


# ---------------------------------------------------------------------------------------------
# Resume inside a stage
# ---------------------------------------------------------------------------------------------

def add_callback_to_every_trainer(monkeypatch, module, callback_class):
    """Every Trainer that `module` makes gets a fresh `callback_class()` (to watch or interrupt training)."""
    original = module.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(callback_class())
        return trainer
    monkeypatch.setattr(module, 'make_trainer', make_trainer)


def fake_checkpoint(work, step, complete=True):
    path = work / f'checkpoint-{step}'
    os.makedirs(path)
    torch.save({'state': 1}, path / 'optimizer.pt')   # a whole torch.save file (a zip), as the Trainer writes
    if complete:
        (path / 'trainer_state.json').write_text(json.dumps({'epoch': 1.0, 'global_step': step}))
    return str(path)


def test_the_newest_complete_checkpoint_is_resumed_from(tmp_path):
    from research_training import resumable_checkpoint
    work = tmp_path / 'work'
    assert resumable_checkpoint(str(work)) is None
    older = fake_checkpoint(work, 5)
    fake_checkpoint(work, 10, complete=False)          # killed while it was written: no trainer_state.json
    assert resumable_checkpoint(str(work)) == older


def test_the_store_keeps_the_checkpoints_of_an_interrupted_stage_only(tmp_path, capsys):
    from research_stages import StageStore
    from research_training import resumable_checkpoint
    root = tmp_path / 'stages'
    resumable, bare = root / f'teacher-{"01" * 8}', root / f'kd-{"02" * 8}'
    fake_checkpoint(resumable / 'work', 5)
    (resumable / 'model.safetensors').write_bytes(b'half')
    fake_checkpoint(bare / 'work', 5, complete=False)
    store = StageStore(str(root), resumable=resumable_checkpoint)
    assert [r['state'] for r in store.stored_stages()] == ['half-written', 'half-written, resumable from its work/ checkpoints']
    assert store.remove_abandoned() == [bare.name]
    assert sorted(os.listdir(resumable)) == ['work'] and not bare.exists()
    assert 'kept the Trainer checkpoints (work/) of the half-written stage' in capsys.readouterr().out
    # --no_reuse_stages starts afresh: nothing kept
    assert StageStore(str(root), reuse=False, resumable=resumable_checkpoint).remove_abandoned() == [resumable.name]


class Interrupted(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


@pytest.mark.slow
def test_an_interrupted_teacher_fine_tune_resumes_at_epoch_2_exactly(tmp_path, tiny_teacher_dir, monkeypatch, capsys):
    import research_training
    begins, ends, interrupt = [], [], [True]

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begins.append((state.epoch or 0.0, state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            ends.append((state.epoch, state.global_step))

        def on_save(self, args, state, control, **kwargs):
            if interrupt[0] and state.epoch >= 1:
                raise Interrupted(f'killed after epoch {state.epoch:g}')

    add_callback_to_every_trainer(monkeypatch, research_training, Probe)

    def run(name, cache):
        return run_cli(fast_args(tmp_path / name, pipeline='baseline', teacher_path=tiny_teacher_dir,
                                 cache_dir=tmp_path / cache, teacher_epochs=2, early_stopping_patience=5,
                                 save_all_stages=True))

    with pytest.raises(Interrupted):
        run('out', 'cache')
    (stage,) = glob.glob(str(tmp_path / 'cache' / 'stages' / 'teacher-*'))
    (checkpoint,) = glob.glob(os.path.join(stage, 'work', 'checkpoint-*'))
    assert not os.path.exists(os.path.join(stage, 'STAGE_COMPLETE'))
    assert {'optimizer.pt', 'scheduler.pt', 'rng_state.pth', 'trainer_state.json'} <= set(os.listdir(checkpoint))
    with open(os.path.join(checkpoint, 'trainer_state.json'), encoding='utf-8') as fh:
        saved = json.load(fh)
    assert saved['epoch'] == 1.0
    steps_per_epoch = saved['global_step']
    capsys.readouterr()

    interrupt[0] = False
    assert run('out', 'cache') == 0                                      # the same run again
    out = capsys.readouterr().out
    assert 'an interrupted attempt left Trainer checkpoints in work/: resuming from them' in out
    assert '[train] resuming an interrupted attempt from' in out
    assert begins[-1] == (1.0, steps_per_epoch) and steps_per_epoch > 0  # started at epoch 2, not from scratch
    assert ends[-1] == (2.0, 2 * steps_per_epoch)
    assert not os.path.exists(os.path.join(stage, 'work')) and os.path.exists(os.path.join(stage, 'STAGE_COMPLETE'))

    # An honest resume: optimizer, scheduler and RNG restored, so the weights are those of an uninterrupted run
    assert run('uninterrupted', 'cache2') == 0
    assert begins[-1] == (0.0, 0)
    resumed = load_file(str(tmp_path / 'out' / 'stages' / 'baseline' / 'model.safetensors'))
    straight = load_file(str(tmp_path / 'uninterrupted' / 'stages' / 'baseline' / 'model.safetensors'))
    assert resumed.keys() == straight.keys()
    assert all(np.allclose(resumed[k], straight[k], atol=1e-6) for k in resumed)


@pytest.mark.slow
def test_an_interrupted_distillation_resumes_with_its_projections(tmp_path, teacher_checkpoint, tiny_student_dir,
                                                                  monkeypatch, capsys):
    """KD trains StudentWithProjections (not a PreTrainedModel; a narrower student gets hidden-state projections):
    its checkpoint, optimizer included, resumes too."""
    import research_kd
    begins, interrupt, captured = [], [True], []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begins.append((state.epoch or 0.0, state.global_step))

        def on_save(self, args, state, control, **kwargs):
            if interrupt[0] and state.epoch >= 1:
                (checkpoint,) = glob.glob(os.path.join(args.output_dir, 'checkpoint-*'))
                captured.append(load_file(os.path.join(checkpoint, 'model.safetensors')))
                raise Interrupted(f'killed after epoch {state.epoch:g}')

    add_callback_to_every_trainer(monkeypatch, research_kd, Probe)

    def run(name, cache):
        return run_cli(fast_args(tmp_path / name, pipeline='kd_only', teacher_checkpoint=teacher_checkpoint,
                                 student_path=tiny_student_dir, kd_method='hidden', cache_dir=tmp_path / cache, epochs=2,
                                 early_stopping_patience=5))

    with pytest.raises(Interrupted):
        run('out', 'cache')
    interrupt[0] = False
    assert run('out', 'cache') == 0
    assert '[train] resuming an interrupted attempt from' in capsys.readouterr().out
    assert begins[-1][0] == 1.0 and begins[-1][1] > 0
    (checkpoint_state,) = [c for c in captured if c]
    assert any(k.startswith('projections.') for k in checkpoint_state)      # the projections were checkpointed
    assert run('uninterrupted', 'cache2') == 0
    resumed = load_file(str(tmp_path / 'out' / 'stages' / 'kd' / 'model.safetensors'))
    straight = load_file(str(tmp_path / 'uninterrupted' / 'stages' / 'kd' / 'model.safetensors'))
    assert all(np.allclose(resumed[k], straight[k], atol=1e-6) for k in resumed)
