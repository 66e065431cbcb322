"""A store and output folder you can trust: checksums verified before reuse, one lock per stage (concurrent
runs produce a shared stage once; a dead owner's lock is taken over), leftovers of interrupted runs removed,
damaged caches rebuilt, exports that never share an inode with the store, and an archive that moves only
the tool's own files and never follows a symbolic link."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import LABELS, ROOT, SAMPLE_CSV, fast_args, run_cli
from research_stages import COMPLETE_MARKER, META_FILE, StageLock, StageStore, copy_stage

# A process that produces (or reuses) one stage of a store: `produce` sleeps, then appends to a count file.
PRODUCER = '''
import os, sys, time
sys.path.insert(0, {root!r})
from research_stages import StageStore
root, count, seconds, together = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
# start together (after the slow imports), so that the others find the stage being produced
open(f'{{count}}.ready-{{os.getpid()}}', 'w').close()
while len([n for n in os.listdir(os.path.dirname(count)) if '.ready-' in n]) < together:
    time.sleep(0.05)

def produce(folder):
    with open(count, 'a') as fh:
        fh.write(f'{{os.getpid()}}\\n')
    with open(os.path.join(folder, 'model.bin'), 'wb') as fh:
        fh.write(os.urandom(4096))
    time.sleep(seconds)
    return {{'made_by': os.getpid()}}

node = StageStore(root).get_or_run('teacher', 'ab' * 8, produce, seed=0)
print('META', node.meta['made_by'], node.reused, flush=True)
'''


def spawn_producer(root, count, seconds, together=1):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, '-c', PRODUCER.format(root=ROOT), str(root), str(count), str(seconds),
                             str(together)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def writer(calls, payload=b'weights' * 1000):
    """A produce(folder) that writes model.safetensors and counts its calls."""
    def produce(folder):
        calls.append(folder)
        with open(os.path.join(folder, 'model.safetensors'), 'wb') as fh:
            fh.write(payload)
        return {'linear_roles': {}, 'call': len(calls)}
    return produce


def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage, message', [
    ('overwrite', 'model.safetensors changed since it was stored (checksum mismatch): rebuilding'),
    ('truncate', 'model.safetensors changed since it was stored (checksum mismatch): rebuilding'),
    ('delete', 'model.safetensors is missing: rebuilding'),
    ('meta', 'stage_meta.json changed since it was stored (checksum mismatch): rebuilding'),
    ('marker', 'its completion record is unreadable'),
])
def test_a_damaged_stored_stage_is_discarded_with_one_line_and_rebuilt(tmp_path, capsys, damage, message):
    store, calls = StageStore(str(tmp_path / 'stages')), []
    first = store.get_or_run('kd', 'ab' * 8, writer(calls), seed=0)
    weights = os.path.join(first.path, 'model.safetensors')
    if damage == 'overwrite':
        with open(weights, 'r+b') as fh:               # in place: same inode, same size
            fh.seek(100)
            fh.write(b'\0' * 16)
    elif damage == 'truncate':
        os.truncate(weights, 10)
    elif damage == 'delete':
        os.remove(weights)
    elif damage == 'meta':
        with open(os.path.join(first.path, META_FILE), 'w') as fh:
            fh.write('{"linear_ro')
    else:
        with open(os.path.join(first.path, COMPLETE_MARKER), 'w') as fh:
            fh.write('')                                # an empty marker, as older versions wrote
    capsys.readouterr()
    again = StageStore(str(tmp_path / 'stages')).get_or_run('kd', 'ab' * 8, writer(calls), seed=0)
    out = capsys.readouterr().out
    assert f'[store] stage kd-{"ab" * 8}: {message}' in out
    assert len(calls) == 2 and not again.reused and again.meta['call'] == 2
    # the rebuilt stage verifies and is reused from now on
    third = StageStore(str(tmp_path / 'stages')).get_or_run('kd', 'ab' * 8, writer(calls), seed=0)
    assert third.reused and len(calls) == 2


def test_an_intact_stage_is_reused_and_its_last_use_recorded(tmp_path):
    store, calls = StageStore(str(tmp_path / 'stages')), []
    node = store.get_or_run('kd', 'cd' * 8, writer(calls), seed=0)
    marker = os.path.join(node.path, COMPLETE_MARKER)
    record = json.load(open(marker))
    assert set(record['files']) == {'model.safetensors', META_FILE}
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname()
    os.utime(marker, (1, 1))
    assert StageStore(str(tmp_path / 'stages')).get_or_run('kd', 'cd' * 8, writer(calls), seed=0).reused
    assert len(calls) == 1 and os.path.getmtime(marker) > 1


def test_a_finished_stage_keeps_no_trainer_checkpoints(tmp_path):
    def produce(folder):
        for sub in ('work/checkpoint-10', 'checkpoint-3', 'work/runs'):
            os.makedirs(os.path.join(folder, sub))
            open(os.path.join(folder, sub, 'optimizer.pt'), 'w').close()
        open(os.path.join(folder, 'model.safetensors'), 'w').close()
        return {}
    node = StageStore(str(tmp_path / 'stages')).get_or_run('teacher', 'ef' * 8, produce, seed=0)
    assert sorted(os.listdir(node.path)) == [COMPLETE_MARKER, 'model.safetensors', META_FILE]


def test_exported_files_never_share_an_inode_with_the_store(tmp_path):
    store, calls = StageStore(str(tmp_path / 'stages')), []
    node = store.get_or_run('quant', '12' * 8, writer(calls), seed=0)
    target = str(tmp_path / 'out' / 'stages' / 'quant')
    os.makedirs(target)
    assert copy_stage(node, target) in ('copy', 'reflink')
    exported = os.path.join(target, 'model.safetensors')
    assert os.stat(exported).st_ino != os.stat(os.path.join(node.path, 'model.safetensors')).st_ino
    assert sorted(os.listdir(target)) == ['model.safetensors']        # no marker, metadata or card
    with open(exported, 'r+b') as fh:                                   # an in-place edit of the export
        fh.write(b'edited')
    assert StageStore(str(tmp_path / 'stages')).get_or_run('quant', '12' * 8, writer(calls), seed=0).reused


# ---------------------------------------------------------------------------------------------
# Locks and leftovers
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_concurrent_processes_produce_a_shared_stage_once_and_wait_for_it(tmp_path):
    root, count = tmp_path / 'stages', tmp_path / 'count'
    procs = [spawn_producer(root, count, 2.0, together=3) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len(open(count).read().split()) == 1                          # produced once
    metas = [line.split() for out in outputs for line in out.splitlines() if line.startswith('META')]
    assert len({m[1] for m in metas}) == 1                                # all got the same stage
    assert sorted(m[2] for m in metas) == ['False', 'True', 'True']
    assert any('is being produced by pid' in out and 'waiting for it' in out for out in outputs)


def test_the_lock_of_a_killed_run_is_free_and_its_half_written_stage_is_rebuilt(tmp_path, capsys):
    root, count = tmp_path / 'stages', tmp_path / 'count'
    proc = spawn_producer(root, count, 120)
    lock_file = str(root / '.locks' / f'teacher-{"ab" * 8}.lock')
    deadline = time.time() + 60
    while not (os.path.exists(count) and os.path.getsize(count)):        # it is producing
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    assert json.load(open(lock_file))['pid'] == proc.pid
    proc.kill()
    proc.wait()
    calls = []
    started = time.time()
    node = StageStore(str(root)).get_or_run('teacher', 'ab' * 8, writer(calls), seed=0)
    assert time.time() - started < 10 and len(calls) == 1 and not node.reused
    assert 'discarding the half-written folder' in capsys.readouterr().out
    assert not os.path.exists(os.path.join(node.path, 'model.bin'))


def test_a_lock_whose_recorded_owner_died_is_taken_over(tmp_path, capsys, monkeypatch):
    """The owner recorded in the lock file is dead, yet the lock is held (e.g. by a child it forked)."""
    monkeypatch.setattr(StageLock, 'poll_seconds', 0.2)
    lock_file = tmp_path / 'teacher-x.lock'
    holder = subprocess.Popen([sys.executable, '-c', f'''
import fcntl, json, sys, time
fh = open({str(lock_file)!r}, 'w')
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write(json.dumps({{"pid": {dead_pid()}, "host": {socket.gethostname()!r}, "since": 0}})); fh.flush()
print('held', flush=True)
time.sleep(60)
'''], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        lock = StageLock(str(lock_file), 'teacher-x')
        started = time.time()
        lock.acquire()
        assert time.time() - started < 10
        assert json.load(open(lock_file))['pid'] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out
    assert 'waiting for it' in out and 'which no longer runs, is taken over' in out


def test_leftovers_of_dead_runs_are_removed_those_of_live_runs_kept(tmp_path):
    root = tmp_path / 'stages'
    store = StageStore(str(root))
    os.makedirs(root / f'kd-{"01" * 8}' / 'work' / 'checkpoint-5')          # half-written, no lock held
    os.makedirs(root / f'prune-{"02" * 8}')                                  # half-written, lock held by a live run
    live = store.lock('prune', '02' * 8)
    host = socket.gethostname()
    dead = f'x.tmp-{host}-{dead_pid()}'
    open(root / dead, 'w').close()
    open(root / f'y.tmp-{host}-{os.getpid()}', 'w').close()
    proc = subprocess.Popen([sys.executable, '-c', f'''
import sys; sys.path.insert(0, {ROOT!r})
from research_stages import StageStore
lock = StageStore({str(root)!r}).lock('prune', {'02' * 8!r}); assert lock.try_acquire()
print('held', flush=True); sys.stdin.read()
'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'held'
        removed = store.remove_abandoned()
        assert removed == [f'kd-{"01" * 8}', dead]
        assert os.path.isdir(root / f'prune-{"02" * 8}') and os.path.exists(root / f'y.tmp-{host}-{os.getpid()}')
        states = {r['kind']: r['state'] for r in store.stored_stages()}
        assert states['prune'].startswith('being produced by pid')
    finally:
        proc.communicate('')
    assert live.try_acquire()
    live.release()


# ---------------------------------------------------------------------------------------------
# Damaged caches
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sample_data():
    from research_data import prepare_data
    return prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1)


@pytest.mark.parametrize('damage', ['truncate_arrow', 'garbage_state', 'no_checksums', 'wrong_labels'])
def test_a_damaged_tokenization_cache_is_rebuilt(tmp_path, capsys, sample_data, tiny_teacher_dir, damage):
    from research_data import CACHE_CHECKSUMS, tokenization_cache_key, tokenize_corpus
    from research_files import folder_checksums, write_json_atomically
    from research_models import load_tokenizer
    tokenizer = load_tokenizer(tiny_teacher_dir)
    fresh = tokenize_corpus(sample_data, tokenizer, 32, str(tmp_path))
    fresh_ids, fresh_labels = list(fresh['input_ids']), list(fresh['labels'])
    del fresh                                         # memory-mapped: never read it once its file is damaged
    path = tmp_path / tokenization_cache_key(sample_data, tokenizer, 32)
    arrow = glob.glob(str(path / '*.arrow'))[0]
    if damage == 'truncate_arrow':
        os.truncate(arrow, os.path.getsize(arrow) // 2)
    elif damage == 'garbage_state':
        (path / 'state.json').write_text('{"_data_files": [')
    elif damage == 'no_checksums':
        os.remove(path / CACHE_CHECKSUMS)
    else:   # consistent checksums, wrong content: another corpus's cache under this name
        import datasets
        other = datasets.Dataset.from_dict({'input_ids': [[1, 2]] * len(sample_data.texts),
                                            'attention_mask': [[1, 1]] * len(sample_data.texts),
                                            'labels': [[0.0] * 5] * len(sample_data.texts)})
        import shutil
        shutil.rmtree(path)
        other.save_to_disk(str(path))
        write_json_atomically(str(path / CACHE_CHECKSUMS), folder_checksums(str(path)))
    capsys.readouterr()
    rebuilt = tokenize_corpus(sample_data, tokenizer, 32, str(tmp_path))
    assert f'[cache] tokenization cache {path.name}: ' in capsys.readouterr().out
    assert list(rebuilt['input_ids']) == fresh_ids
    assert list(tokenize_corpus(sample_data, tokenizer, 32, str(tmp_path))['labels']) == fresh_labels
    assert 'rebuilding' not in capsys.readouterr().out                     # the rebuilt cache is trusted


@pytest.mark.parametrize('damage, reason', [
    ('truncate', 'unreadable'), ('all_nan', 'non-finite value'), ('shape', 'shape'), ('dtype', 'dtype float64'),
])
def test_a_damaged_teacher_logit_cache_is_rebuilt(tmp_path, capsys, sample_data, teacher_checkpoint, damage, reason):
    from research_data import tokenized_splits
    from research_kd import cached_teacher_logits, teacher_logits_cache_key
    from research_models import load_fine_tuned_classifier
    teacher, tokenizer = load_fine_tuned_classifier(teacher_checkpoint, LABELS)
    train = tokenized_splits(sample_data, tokenizer, 32, str(tmp_path)).train
    fresh, cached = cached_teacher_logits(teacher, tokenizer, train, sample_data, 32, str(tmp_path))
    assert not cached
    path = tmp_path / teacher_logits_cache_key(teacher, tokenizer, sample_data, 32)
    if damage == 'truncate':
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == 'all_nan':
        np.save(open(path, 'wb'), np.full_like(fresh, np.nan))
    elif damage == 'shape':
        np.save(open(path, 'wb'), fresh[:-1])
    else:
        np.save(open(path, 'wb'), fresh.astype(np.float64))
    capsys.readouterr()
    logits, cached = cached_teacher_logits(teacher, tokenizer, train, sample_data, 32, str(tmp_path))
    out = capsys.readouterr().out
    assert not cached and f'[cache] teacher-logit cache {path.name}: ' in out and reason in out and 'rebuilding' in out
    np.testing.assert_allclose(logits, fresh, rtol=1e-5, atol=1e-6)
    assert cached_teacher_logits(teacher, tokenizer, train, sample_data, 32, str(tmp_path))[1]


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

def final_metrics(out_dir):
    with open(os.path.join(out_dir, 'results_final.json'), encoding='utf-8') as fh:
        return [(s['stage'], s['f1_macro'], s['roc_auc_macro'], s['params_nonzero']) for s in json.load(fh)['stages']]


def corrupt_int8_matrix(onnx_path):
    """Change the values of one int8 weight matrix of a quantized graph, written back in place."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(onnx_path)
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2)
    values = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((-values.astype(np.int16)).clip(-127, 127).astype(np.int8), init.name))
    with open(onnx_path, 'r+b') as fh:
        data = model.SerializeToString()
        fh.write(data)
        fh.truncate(len(data))


@pytest.mark.slow
def test_corrupted_stored_stages_are_detected_and_rebuilt_with_the_original_metrics(tmp_path, capsys, teacher_checkpoint):
    cache = tmp_path / 'cache'
    argv = lambda n: fast_args(tmp_path / f'out{n}', pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                               cache_dir=cache, save_all_stages=True)
    assert run_cli(argv(0)) == 0
    original = final_metrics(tmp_path / 'out0')
    teacher_dir = glob.glob(str(cache / 'stages' / 'teacher-*'))[0]
    quant_dir = glob.glob(str(cache / 'stages' / 'quant-*'))[0]
    teacher, quant = os.path.basename(teacher_dir), os.path.basename(quant_dir)

    # An in-place write to an exported model does not reach the store (exports are copies).
    with open(tmp_path / 'out0' / 'stages' / 'quant' / 'model.onnx', 'r+b') as fh:
        fh.seek(1000)
        fh.write(b'\x7f' * 64)
    damages = [
        # (what is done to the store, the lines expected)
        (lambda: None, []),
        (lambda: (overwrite_middle(os.path.join(teacher_dir, 'model.safetensors')),
                  corrupt_int8_matrix(os.path.join(quant_dir, 'model.onnx'))),
         [f'[store] stage {teacher}: model.safetensors changed since it was stored (checksum mismatch): rebuilding',
          f'[store] stage {quant}: model.onnx changed since it was stored (checksum mismatch): rebuilding']),
        (lambda: (os.truncate(os.path.join(teacher_dir, 'model.safetensors'), 1000),
                  os.truncate(os.path.join(quant_dir, 'model.onnx'), 1000)),
         [f'[store] stage {teacher}: model.safetensors changed', f'[store] stage {quant}: model.onnx changed']),
        (lambda: open(os.path.join(quant_dir, META_FILE), 'w').write('{"linear'),
         [f'[store] stage {quant}: stage_meta.json changed']),
    ]
    for n, (damage, expected) in enumerate(damages, start=1):
        damage()
        capsys.readouterr()
        assert run_cli(argv(n)) == 0
        out = capsys.readouterr().out
        assert all(line in out for line in expected), out
        assert out.count('[store] stage') == len(expected)
        assert final_metrics(tmp_path / f'out{n}') == original
        rebuilt = {e['kind'] for e in json.load(open(tmp_path / f'out{n}' / 'stage_log.json')) if not e['reused']}
        assert rebuilt == {line.split()[2].split('-')[0] for line in expected}


def overwrite_middle(path):
    with open(path, 'r+b') as fh:
        fh.seek(os.path.getsize(path) // 2)
        fh.write(b'\x11' * 64)


def make_fake_repository(folder):
    os.makedirs(folder / '.git' / 'objects')
    (folder / '.git' / 'HEAD').write_text('ref: refs/heads/main\n')
    (folder / 'train.py').write_text('print("my code")\n')
    os.makedirs(folder / 'data')
    (folder / 'data' / 'mine.csv').write_text('a,b\n1,2\n')
    return {p: open(p, 'rb').read() for p in glob.glob(str(folder / '**'), recursive=True, include_hidden=True)
            if os.path.isfile(p)}


def test_a_repository_as_output_folder_keeps_every_user_file(tmp_path, teacher_checkpoint):
    from research_compression_config import TOOL_OUTPUTS
    repo = tmp_path / 'repo'
    user_files = make_fake_repository(repo)
    (repo / 'config.json').write_text('{"my": "own config"}')          # a user file with one of the tool's names
    argv = fast_args(repo, pipeline='baseline', teacher_checkpoint=teacher_checkpoint, cache_dir=tmp_path / 'cache')
    assert run_cli(argv) == 2                                    # a foreign folder needs --overwrite_output_dir
    assert run_cli(argv + ['--overwrite_output_dir']) == 0
    first = (repo / 'results_final.json').read_text()
    time.sleep(1.1)
    assert run_cli(argv + ['--overwrite_output_dir']) == 0     # now an earlier run: archived
    for path, content in user_files.items():
        assert open(path, 'rb').read() == content, path
    archives = sorted(glob.glob(str(repo / 'previous_runs' / '*')))
    assert len(archives) == 2 and all(set(os.listdir(a)) <= set(TOOL_OUTPUTS) for a in archives)
    assert os.listdir(archives[0]) == ['config.json']                      # the user's, moved aside, not overwritten
    assert open(os.path.join(archives[0], 'config.json')).read() == '{"my": "own config"}'
    assert open(os.path.join(archives[1], 'results_final.json')).read() == first
    assert set(os.listdir(repo)) - set(TOOL_OUTPUTS) == {'.git', 'train.py', 'data', 'previous_runs'}


def test_a_symlink_in_the_output_folder_deletes_nothing_outside(tmp_path, teacher_checkpoint):
    outside = tmp_path / 'elsewhere'
    os.makedirs(outside / 'baseline')
    (outside / 'baseline' / 'precious.txt').write_text('keep me')
    (outside / 'notes.txt').write_text('keep me too')
    out = tmp_path / 'out'
    os.makedirs(out)
    os.symlink(outside, out / 'stages')
    (out / 'thesis.tex').write_text('mine')
    argv = fast_args(out, pipeline='baseline', teacher_checkpoint=teacher_checkpoint, cache_dir=tmp_path / 'cache')
    for _ in range(2):                       # a foreign folder, then an earlier run whose stages/ became a link
        assert run_cli(argv + ['--overwrite_output_dir']) == 0
        assert (outside / 'baseline' / 'precious.txt').read_text() == 'keep me'
        assert sorted(os.listdir(outside)) == ['baseline', 'notes.txt'] and os.listdir(outside / 'baseline') == ['precious.txt']
        assert not os.path.islink(out / 'stages') and (out / 'thesis.tex').read_text() == 'mine'
        assert os.path.isfile(out / 'stages' / 'baseline' / 'model.safetensors')
        os.rename(out / 'stages', tmp_path / f'real_stages_{time.time()}')
        os.symlink(outside, out / 'stages')
        time.sleep(1.1)
    moved = glob.glob(str(out / 'previous_runs' / '*' / 'stages'))
    assert len(moved) == 2 and all(os.path.islink(m) for m in moved)     # moved as links, never followed


def test_exports_never_follow_a_link_or_leave_the_output_folder(tmp_path):
    from research_files import fresh_folder_inside
    outside = tmp_path / 'elsewhere'
    os.makedirs(outside / 'quant')
    (outside / 'quant' / 'precious.txt').write_text('keep me')
    out = tmp_path / 'out'
    os.makedirs(out / 'runs' / 'fold0_seed1')
    os.symlink(outside, out / 'runs' / 'fold0_seed1' / 'stages')
    notes = fresh_folder_inside(str(out), str(out / 'runs' / 'fold0_seed1' / 'stages' / 'quant'))
    assert len(notes) == 1 and 'the link was replaced by a folder' in notes[0]
    assert (outside / 'quant' / 'precious.txt').read_text() == 'keep me'
    assert os.listdir(out / 'runs' / 'fold0_seed1' / 'stages' / 'quant') == []
    with pytest.raises(ValueError):
        fresh_folder_inside(str(out), str(outside / 'quant'))
    with pytest.raises(ValueError):
        fresh_folder_inside(str(out), str(out / '..' / 'elsewhere'))


def test_cache_report_and_prune_need_no_dataset(tmp_path, capsys, teacher_checkpoint):
    cache = tmp_path / 'cache'
    assert run_cli(fast_args(tmp_path / 'out', pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                             cache_dir=cache)) == 0
    capsys.readouterr()
    assert run_cli(['--cache_report', '--cache_dir', str(cache)]) == 0
    report = capsys.readouterr().out
    assert '2 stage folder(s)' in report and 'quant_method=dynamic' in report and 'tokenization caches: 1' in report
    assert '--cache_prune_older_than DAYS' in report and 'Disk use of' in report
    assert run_cli(['--cache_prune_older_than', '30', '--cache_dir', str(cache)]) == 0
    assert 'removed 0 stage(s), 0 cache(s)' in capsys.readouterr().out
    assert run_cli(['--cache_prune_older_than', '0', '--cache_dir', str(cache), '--cache_report']) == 0
    out = capsys.readouterr().out
    assert 'removed 2 stage(s), 1 cache(s)' in out and '0 stage folder(s)' in out
    assert run_cli(['--cache_report', '--cache_dir', str(tmp_path / 'nowhere')]) == 2


@pytest.mark.slow
def test_two_concurrent_runs_of_a_sweep_train_the_shared_teacher_once(tmp_path, tiny_teacher_dir):
    """Real `python research_main.py` processes with the same --cache_dir and different --kd_alpha."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    procs = []
    for alpha in ('0.3', '0.9'):
        argv = fast_args(tmp_path / f'alpha_{alpha}', pipeline='kd_only', teacher_path=tiny_teacher_dir,
                         cache_dir=tmp_path / 'cache', student_layers=2, kd_alpha=alpha, teacher_epochs=1, epochs=1)
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv,
                                       '--no_progress_bars'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    events = [e for alpha in ('0.3', '0.9') for e in json.load(open(tmp_path / f'alpha_{alpha}' / 'stage_log.json'))]
    teacher = [e for e in events if e['kind'] == 'teacher']
    assert len(teacher) == 2 and sum(not e['reused'] for e in teacher) == 1       # trained once, reused once
    students = [e for e in events if e['kind'] == 'kd']
    assert len({e['key'] for e in students}) == 2 and not any(e['reused'] for e in students)
    for alpha in ('0.3', '0.9'):
        assert final_metrics(tmp_path / f'alpha_{alpha}')[0][0] == 'baseline'


def test_readme_and_help_name_every_output_the_archive_moves():
    # The output-folder reference lives in docs/store_and_output.md; the README links it.
    from research_compression_config import TOOL_OUTPUTS, build_argument_parser
    from research_output import CONFIG_JSON, RESULTS_CSV, RESULTS_JSON, RUN_LOG, STAGE_LOG
    assert {CONFIG_JSON, RESULTS_CSV, RESULTS_JSON, RUN_LOG, STAGE_LOG} <= set(TOOL_OUTPUTS)
    doc = open(os.path.join(ROOT, 'docs', 'store_and_output.md'), encoding='utf-8').read()
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    assert 'docs/store_and_output.md' in readme
    help_text = ' '.join(build_argument_parser().format_help().split())
    for name in TOOL_OUTPUTS:
        assert f'`{name}`' in doc or f'`{name}/`' in doc, name
        assert name in help_text, name
    for flag in ('--cache_report', '--cache_prune_older_than', '--overwrite_output_dir'):
        assert flag in doc and flag in help_text
