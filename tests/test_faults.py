"""research_main against a faulty machine and odd files: an earlier run that cannot be moved, a full disk,
Ctrl-C and SIGTERM, a CSV whose header names a column twice. Each ends with exit 2 (130/143 for an
interrupt) and one paragraph, no traceback, nothing that looks complete, an earlier run untouched."""

import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE_CSV, fast_args, run_cli
from test_bad_input import args_for, make_earlier_run, snapshot

# Imported at collection, not under a test's capsys: transformers' log handler keeps the stderr it first saw
import research_main  # noqa: E402,F401


def run_and_capture(capsys, argv):
    code = run_cli(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_paragraph_refusal(code, err, *fragments):
    assert code == 2, err
    assert 'Traceback' not in err and '\n\n' not in err.strip(), err
    for fragment in fragments:
        assert fragment in err, err


def no_training(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError('a model was trained before the run was refused')
    monkeypatch.setattr(transformers.Trainer, 'train', refuse)


def chattr(flag, path):
    return subprocess.run(['chattr', flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def immutable(request):
    """Mark paths immutable (chattr +i); skipped where the filesystem or the user cannot; undone afterwards."""
    marked = []

    def mark(path):
        if not chattr('+i', path):
            pytest.skip('chattr +i is not supported here (filesystem or permissions)')
        marked.append(path)
    yield mark
    for path in reversed(marked):
        chattr('-i', path)


def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})')


@pytest.fixture
def tmpfs():
    mounted = []

    def mount(path, size='2m'):
        mount_tmpfs(path, size)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(['umount', '-l', str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# The output folder: every entry of an earlier run moves, or none does
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('entry', ['results_final.json', 'stages'])
def test_an_immutable_entry_of_an_earlier_run_is_refused_before_anything_moves(tmp_path, capsys, monkeypatch,
                                                                             tiny_teacher_dir, immutable, entry):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    immutable(out / entry)
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, f"'{out / entry}' is marked immutable (chattr +i)", 'nothing was moved')
    assert snapshot(out) == before and not (out / 'previous_runs').exists()


def test_an_immutable_output_folder_is_refused_before_anything_moves(tmp_path, capsys, monkeypatch, tiny_teacher_dir,
                                                                     immutable):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    immutable(out)
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, f"--output_dir '{out}' cannot be written")
    assert snapshot(out) == before


def test_an_immutable_previous_runs_folder_is_refused(tmp_path, capsys, monkeypatch, tiny_teacher_dir, immutable):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    (out / 'previous_runs').mkdir()
    immutable(out / 'previous_runs')
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, "previous_runs' is marked immutable")
    assert snapshot(out) == before


def test_a_mount_point_in_an_earlier_run_is_refused(tmp_path, capsys, monkeypatch, tiny_teacher_dir, tmpfs):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    tmpfs(out / 'logs', '1m')
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, "logs' is a mount point")
    assert snapshot(out) == before


def test_previous_runs_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, tiny_teacher_dir):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    (out / 'previous_runs').write_text('not a folder')
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, "previous_runs' is not a folder")
    assert snapshot(out) == before


def test_a_rename_that_fails_anyway_puts_back_what_had_moved(tmp_path, capsys, monkeypatch, tiny_teacher_dir):
    """A failure no check foresaw (here a mocked EXDEV on the third entry): the two already moved go back."""
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    before = snapshot(out)
    real_rename, calls = os.rename, []

    def failing_rename(source, target):
        calls.append(source)
        if len(calls) == 3:
            raise OSError(errno.EXDEV, 'Invalid cross-device link')
        real_rename(source, target)
    monkeypatch.setattr(os, 'rename', failing_rename)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert_one_paragraph_refusal(code, err, os.path.basename(calls[2]), 'were put back')
    assert snapshot(out) == before and not (out / 'previous_runs').exists()


# ---------------------------------------------------------------------------------------------
# A CSV header that names a column twice
# ---------------------------------------------------------------------------------------------

def csv_with_header(tmp_path, rename):
    lines = open(SAMPLE_CSV, encoding='utf-8').read().splitlines()
    header = lines[0].split(',')
    header = [rename.get(i, name) for i, name in enumerate(header)]
    path = tmp_path / 'dup.csv'
    path.write_text('\n'.join([','.join(header)] + lines[1:]) + '\n', encoding='utf-8')
    return path


@pytest.mark.parametrize('rename, asked, expected', [
    ({0: 'comment'}, {}, "'comment' (2 times)"),              # the text column twice
    ({1: 'bully'}, {}, "'bully' (2 times)"),                  # a label column twice
    ({1: 'spam'}, {'label_columns': 'bully,sexual,religious,threat,spam.1'}, "no column named 'spam.1'"),
], ids=['text_column_twice', 'label_column_twice', 'renamed_duplicate_asked_for'])
def test_a_header_that_names_a_used_column_twice_is_refused(tmp_path, capsys, monkeypatch, tiny_teacher_dir, rename,
                                                            asked, expected):
    no_training(monkeypatch)
    out = tmp_path / 'out'
    make_earlier_run(out)
    before = snapshot(out)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir, dataset_path=csv_with_header(tmp_path, rename),
                                                 **asked))
    assert_one_paragraph_refusal(code, err, expected)
    assert snapshot(out) == before


def test_a_repeated_name_the_run_does_not_read_is_no_problem(tmp_path):
    from research_data import load_labeled_csv
    path = csv_with_header(tmp_path, {1: 'Gender'})            # 'Gender' twice; neither is read
    frame = load_labeled_csv(str(path), 'comment', ['bully', 'spam'])
    assert list(frame.columns) == ['comment', 'bully', 'spam']


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------

def temporaries_under(folder):
    from research_files import TEMPORARY_TAG
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if TEMPORARY_TAG in n]


def completion_records(folder):
    return [os.path.join(r, n) for r, _, fs in os.walk(folder) for n in fs if n == 'STAGE_COMPLETE']


def write_checkpoint(folder, step, whole=True):
    import torch
    path = os.path.join(folder, f'checkpoint-{step}')
    os.makedirs(path)
    torch.save({'state': torch.zeros(100)}, os.path.join(path, 'optimizer.pt'))
    with open(os.path.join(path, 'trainer_state.json'), 'w') as fh:
        fh.write('{"global_step": %d}' % step if whole else '{"global_st')
    return path


@pytest.mark.parametrize('error', [OSError(errno.ENOSPC, 'No space left on device'),
                                   RuntimeError('[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: '
                                                'basic_ios::clear: iostream error'),
                                   Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                             'message: "No space left on device" })')],
                         ids=['errno_28', 'torch_iostream_error', 'safetensors_os_error_28'])
def test_a_full_disk_while_a_stage_is_written_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, error):
    import research_faults
    from research_errors import UsageError
    from research_stages import StageStore
    from research_training import resumable_checkpoint
    monkeypatch.setattr(research_faults, 'free_bytes', lambda path: 3 * 2 ** 20)
    store = StageStore(str(tmp_path / 'stages'), resumable=resumable_checkpoint)
    parent = tmp_path / 'parent'
    parent.mkdir()
    (parent / 'model.safetensors').write_bytes(b'x' * 2 ** 20)

    def produce(folder):
        work = os.path.join(folder, 'work')
        os.makedirs(work)
        write_checkpoint(work, 10)
        write_checkpoint(work, 20, whole=False)        # the one being written when the disk filled
        open(os.path.join(folder, 'model.safetensors.tmp-x-1'), 'wb').write(b'partial')
        raise error
    with pytest.raises(UsageError) as exc:
        store.get_or_run('kd', '0' * 16, produce, seed=1, made_from=str(parent))
    message = str(exc.value)
    assert message.startswith(f'no space left on {store.path("kd", "0" * 16)}: 4.0 MB needed, 3.0 MB free'), message
    assert 'checkpoint-10 is kept' in message and '\n' not in message
    assert sorted(os.listdir(store.path('kd', '0' * 16))) == ['work']
    assert os.listdir(os.path.join(store.path('kd', '0' * 16), 'work')) == ['checkpoint-10']
    assert completion_records(store.root) == []
    assert store.load('kd', '0' * 16) is None


def test_a_stream_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path):
    from research_stages import StageStore

    def produce(folder):
        raise RuntimeError('basic_ios::clear: iostream error')
    store = StageStore(str(tmp_path / 'stages'))
    with pytest.raises(RuntimeError, match='iostream error'):
        store.get_or_run('kd', '1' * 16, produce, seed=1)


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    from research_training import resumable_checkpoint
    write_checkpoint(str(tmp_path), 10)
    newest = write_checkpoint(str(tmp_path), 20)
    assert resumable_checkpoint(str(tmp_path)) == newest
    with open(os.path.join(newest, 'optimizer.pt'), 'r+b') as fh:
        fh.truncate(100)                               # cut short: its zip directory is gone
    assert resumable_checkpoint(str(tmp_path)).endswith('checkpoint-10')


def test_a_full_disk_while_results_are_written_is_refused_with_temporaries_removed(tmp_path, capsys, tiny_teacher_dir,
                                                                                   monkeypatch):
    import research_main
    from research_files import temporary_path

    def full_disk(folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)
        with open(temporary_path(os.path.join(folder, 'results_final.csv')), 'wb') as fh:
            fh.write(b'x' * 5000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(research_main, 'write_pipeline_results', full_disk)
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir, teacher_epochs=1))
    assert_one_paragraph_refusal(code, err, 'no space left on ', 'MB needed', 'MB free')
    assert temporaries_under(tmp_path / 'out') == [] and not (tmp_path / 'out' / 'results_final.json').exists()


def test_a_full_cache_disk_is_refused_with_what_is_needed(tmp_path, capsys, tiny_teacher_dir, tmpfs):
    """The class test on a real filesystem: the stage store on a 2 MB tmpfs, where the tiny teacher's first
    checkpoint (weights and optimizer state, about 6 MB) cannot fit."""
    cache = tmpfs(tmp_path / 'cache', '2m')
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir, teacher_epochs=1))
    assert_one_paragraph_refusal(code, err, f'no space left on {cache}', 'MB needed', 'MB free')
    assert completion_records(cache) == [] and temporaries_under(cache) == []
    assert not (tmp_path / 'out' / 'results_final.json').exists()
    log = (tmp_path / 'out' / 'run.log').read_text()
    assert 'no space left on' in log                     # the output folder had room: the log says why it stopped


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ---------------------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_exit_130_and_the_log_says_so(tmp_path, capsys, monkeypatch, tiny_teacher_dir):
    import transformers

    def interrupted(*args, **kwargs):
        print('[test] last line before the interrupt')
        raise KeyboardInterrupt
    monkeypatch.setattr(transformers.Trainer, 'train', interrupted)
    code = run_cli(args_for(tmp_path, tiny_teacher_dir))
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip().splitlines()[-1].startswith('interrupted by Ctrl-C (SIGINT): ')
    assert err.count('interrupted by') == 1 and 'Traceback' not in err and 'KeyboardInterrupt' not in err
    log = (tmp_path / 'out' / 'run.log').read_text()
    assert '[test] last line before the interrupt' in log and log.rstrip().endswith('to continue.')


def wait_for_checkpoint(cache, proc, timeout=600):
    import glob
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(os.path.join(cache, 'stages', '*', 'work', 'checkpoint-*', 'trainer_state.json')):
            return True
        time.sleep(0.05)
    return False


def cli_process(argv, env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def quality(output_dir):
    """Every quality number of every stage (latency and memory are measurements of the moment, left out)."""
    results = json.load(open(os.path.join(output_dir, 'results_final.json')))
    keep = ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro', 'per_label',
            'params_nonzero', 'size_mb')
    return [{k: s.get(k) for k in keep} for s in results['stages']]


@pytest.mark.slow
def test_sigterm_and_sigint_mid_training_resume_to_the_metrics_of_an_uninterrupted_run(tmp_path, tiny_teacher_dir):
    import signal
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    common = dict(pipeline='baseline', teacher_path=tiny_teacher_dir, teacher_epochs=6, early_stopping_patience=10,
                  no_progress_bars=True, latency_runs=1)
    reference = tmp_path / 'reference'
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'research_main.py'),
                           *fast_args(reference, cache_dir=tmp_path / 'cache_ref', **common)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for signum, code, name in [(signal.SIGTERM, 143, 'SIGTERM'), (signal.SIGINT, 130, 'Ctrl-C (SIGINT)')]:
        out, cache = tmp_path / f'out_{code}', tmp_path / f'cache_{code}'
        argv = fast_args(out, cache_dir=cache, **common)
        proc = cli_process(argv, env)
        if not wait_for_checkpoint(str(cache), proc):
            proc.kill()
            pytest.fail(f'no checkpoint appeared before the run ended: {proc.communicate()[1][-2000:]}')
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == code, stderr[-3000:]
        assert 'Traceback' not in stderr and stderr.strip().splitlines()[-1].startswith(f'interrupted by {name}')
        log = (out / 'run.log').read_text()
        printed = [line for line in stdout.splitlines() if line.strip()]
        assert printed and all(line in log for line in printed[-5:])          # the log is complete up to the kill
        assert log.rstrip().endswith('to continue.')
        resumed = subprocess.run([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv], env=env,
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert '[train] resuming an interrupted attempt' in resumed.stdout
        assert quality(out) == quality(reference)


def test_a_full_disk_while_a_model_is_exported_removes_the_half_copy(tmp_path, monkeypatch):
    import research_faults
    import research_stages
    from research_errors import UsageError
    from research_stages import StageNode, copy_stage
    stored = tmp_path / 'stored'
    stored.mkdir()
    (stored / 'model.safetensors').write_bytes(b'w' * 3 * 2 ** 20)
    (stored / 'config.json').write_text('{}')
    monkeypatch.setattr(research_faults, 'free_bytes', lambda path: 2 ** 20)

    def full_disk(source, target):
        open(target, 'wb').write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(research_stages, 'copy_file_unshared', full_disk)
    target = tmp_path / 'out' / 'stages' / 'final'
    with pytest.raises(UsageError, match=r'no space left on .*final: 3\.0 MB needed, 1\.0 MB free'):
        copy_stage(StageNode('kd', '2' * 16, str(stored)), str(target))
    assert not target.exists()
