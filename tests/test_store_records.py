"""A completion record proves the whole folder: every file of a stored stage must be listed in its record
(an unlisted or extra file makes the stage untrusted), and the record must name the stage of its folder.
An untrusted stage is discarded with one [store] line and rebuilt, with the metrics of an untouched run."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from conftest import fast_args, run_cli
from research_stages import COMPLETE_MARKER, StageStore
from test_store import final_metrics, writer

KEY, OTHER = 'ab' * 8, 'cd' * 8


def rewrite_record(folder, change):
    marker = os.path.join(folder, COMPLETE_MARKER)
    record = json.load(open(marker))
    change(record)
    with open(marker, 'w') as fh:
        json.dump(record, fh)


def drop_from_record(name):
    return lambda folder: rewrite_record(folder, lambda r: r['files'].pop(name))


def add_file(name):
    def damage(folder):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), 'wb') as fh:
            fh.write(b'planted')
    return damage


def plant_link(folder):
    os.symlink('/etc/hostname', os.path.join(folder, 'tokenizer.json'))


def record_of_another_stage(folder):
    rewrite_record(folder, lambda r: r.update(key=OTHER))


def record_of_another_kind(folder):
    rewrite_record(folder, lambda r: r.update(kind='teacher'))


def record_pointing_outside(folder):
    rewrite_record(folder, lambda r: r['files'].update({'../outside.bin': {'sha256': '0', 'bytes': 0}}))


@pytest.mark.parametrize('damage, message', [
    (drop_from_record('model.safetensors'), 'model.safetensors is not in its completion record'),
    (add_file('extra.bin'), 'extra.bin is not in its completion record'),
    (add_file('sub/deeper.bin'), 'sub/deeper.bin is not in its completion record'),
    (plant_link, 'tokenizer.json is not in its completion record'),
    (record_of_another_stage, f'its completion record belongs to stage kd-{OTHER}, not to this folder'),
    (record_of_another_kind, f'its completion record belongs to stage teacher-{KEY}, not to this folder'),
    (record_pointing_outside, '../outside.bin is not in its completion record'),
])
def test_a_record_that_does_not_prove_its_folder_makes_the_stage_untrusted(tmp_path, capsys, damage, message):
    store, calls = StageStore(str(tmp_path / 'stages')), []
    first = store.get_or_run('kd', KEY, writer(calls), seed=0)
    damage(first.path)
    capsys.readouterr()
    again = StageStore(str(tmp_path / 'stages')).get_or_run('kd', KEY, writer(calls), seed=0)
    out = capsys.readouterr().out
    assert f'[store] stage kd-{KEY}: {message}' in out and out.rstrip().count('[store]') == 1, out
    assert len(calls) == 2 and not again.reused
    assert not os.path.lexists(os.path.join(again.path, 'extra.bin'))
    assert StageStore(str(tmp_path / 'stages')).get_or_run('kd', KEY, writer(calls), seed=0).reused


def test_a_record_copied_from_another_folder_is_not_trusted(tmp_path, capsys):
    """A whole stage folder copied under another key (its record intact) is not that other stage."""
    store, calls = StageStore(str(tmp_path / 'stages')), []
    first = store.get_or_run('kd', KEY, writer(calls), seed=0)
    shutil.copytree(first.path, store.path('kd', OTHER))
    capsys.readouterr()
    node = StageStore(str(tmp_path / 'stages')).get_or_run('kd', OTHER, writer(calls), seed=0)
    assert f'[store] stage kd-{OTHER}: its completion record belongs to stage kd-{KEY}' in capsys.readouterr().out
    assert not node.reused and len(calls) == 2


def overwrite_one_tensor(path):
    """Random values over the data of the largest tensor of a safetensors file (same size, header intact)."""
    with open(path, 'rb') as fh:
        length = int.from_bytes(fh.read(8), 'little')
        header = json.loads(fh.read(length))
    begin, end = max((e['data_offsets'] for n, e in header.items() if n != '__metadata__'), key=lambda o: o[1] - o[0])
    with open(path, 'r+b') as fh:
        fh.seek(8 + length + begin)
        fh.write(np.random.default_rng(0).standard_normal((end - begin) // 4).astype(np.float32).tobytes())


def test_a_prune_stage_missing_from_its_record_is_rebuilt_with_the_original_metrics(tmp_path, capsys, teacher_checkpoint):
    cache = tmp_path / 'cache'
    argv = lambda n: fast_args(tmp_path / f'out{n}', pipeline='prune_only', teacher_checkpoint=teacher_checkpoint,
                               cache_dir=cache)
    assert run_cli(argv(0)) == 0
    original = final_metrics(tmp_path / 'out0')
    prune_dir = glob.glob(str(cache / 'stages' / 'prune-*'))[0]
    drop_from_record('model.safetensors')(prune_dir)
    overwrite_one_tensor(os.path.join(prune_dir, 'model.safetensors'))
    capsys.readouterr()
    assert run_cli(argv(1)) == 0
    out = capsys.readouterr().out
    line = f'[store] stage {os.path.basename(prune_dir)}: model.safetensors is not in its completion record'
    assert line in out and out.count('[store] stage') == 1, out
    assert final_metrics(tmp_path / 'out1') == original
    rebuilt = [e['kind'] for e in json.load(open(tmp_path / 'out1' / 'stage_log.json')) if not e['reused']]
    assert rebuilt == ['prune']
