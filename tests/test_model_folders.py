"""Every model folder a run uses is opened before anything moves or trains: each model role x each way a
folder can be broken is refused with exit 2, a message naming the flag, no training, and the earlier run in
--output_dir untouched."""

import json
import os
import shutil

import pytest

from conftest import LABELS, fast_args, run_cli
from research_compression_config import TOOL_MARKER

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json')


def truncate_weights(folder):
    path = os.path.join(folder, 'model.safetensors')
    os.truncate(path, os.path.getsize(path) // 2)


def remove_tokenizer(folder):
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def remove_config(folder):
    os.remove(os.path.join(folder, 'config.json'))


DAMAGES = {'truncated weights': (truncate_weights, 'model.safetensors is cut short'),
           'no tokenizer': (remove_tokenizer, 'has no usable tokenizer'),
           'no config': (remove_config, 'has no config.json')}


def earlier_run(out):
    """An output folder holding an earlier run of the tool, whose files must not move."""
    os.makedirs(out)
    with open(os.path.join(out, 'config.json'), 'w') as fh:
        json.dump({'tool': TOOL_MARKER}, fh)
    with open(os.path.join(out, 'run.log'), 'w') as fh:
        fh.write('the earlier run\n')
    return sorted(os.listdir(out))


def assert_refused_before_work(tmp_path, capsys, argv, flag, message):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    before = earlier_run(out)
    capsys.readouterr()
    assert run_cli(argv + ['--output_dir', str(out), '--cache_dir', str(cache)]) == 2
    err = capsys.readouterr().err
    assert flag in err and message in err and 'Traceback' not in err, err
    assert sorted(os.listdir(out)) == before and open(out / 'run.log').read() == 'the earlier run\n'
    assert not os.path.exists(cache / 'stages') or not os.listdir(cache / 'stages')


@pytest.mark.parametrize('damage', list(DAMAGES))
@pytest.mark.parametrize('role', ['teacher_path', 'teacher_checkpoint', 'student_path'])
def test_every_model_role_with_a_broken_folder_is_refused_before_work(tmp_path, capsys, tiny_teacher_dir,
                                                                      tiny_student_dir, teacher_checkpoint, role, damage):
    source = {'teacher_path': tiny_teacher_dir, 'teacher_checkpoint': teacher_checkpoint,
              'student_path': tiny_student_dir}[role]
    broken = str(tmp_path / 'model')
    shutil.copytree(source, broken)
    apply, message = DAMAGES[damage]
    apply(broken)
    settings = {'teacher_path': dict(pipeline='baseline', teacher_path=broken),
                'teacher_checkpoint': dict(pipeline='baseline', teacher_checkpoint=broken),
                'student_path': dict(pipeline='kd_only', teacher_path=tiny_teacher_dir, student_path=broken)}[role]
    assert_refused_before_work(tmp_path, capsys, fast_args(tmp_path / 'unused', **settings), f'--{role}', message)


def test_a_checkpoint_whose_labels_differ_is_refused_before_work(tmp_path, capsys, teacher_checkpoint):
    argv = fast_args(tmp_path / 'unused', pipeline='baseline', teacher_checkpoint=teacher_checkpoint,
                     label_columns=','.join(reversed(LABELS)))
    assert_refused_before_work(tmp_path, capsys, argv, '--teacher_checkpoint', 'was trained on labels')


def test_a_checkpoint_without_a_trained_head_is_refused_before_work(tmp_path, capsys, tiny_teacher_dir):
    argv = fast_args(tmp_path / 'unused', pipeline='baseline', teacher_checkpoint=tiny_teacher_dir)
    assert_refused_before_work(tmp_path, capsys, argv, '--teacher_checkpoint', 'has no trained classification head')


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused(tmp_path, capsys, tiny_teacher_dir):
    """A header that lies (a tensor's byte range shorter than its dtype x shape) is caught as well."""
    broken = str(tmp_path / 'model')
    shutil.copytree(tiny_teacher_dir, broken)
    path = os.path.join(broken, 'model.safetensors')
    data = open(path, 'rb').read()
    length = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + length])
    name = next(n for n in header if n != '__metadata__')
    header[name]['shape'] = [header[name]['shape'][0] + 1] + header[name]['shape'][1:]
    text = json.dumps(header, separators=(',', ':')).encode()
    assert len(text) <= length
    text = text.ljust(length)
    open(path, 'wb').write(data[:8] + text + data[8 + length:])
    argv = fast_args(tmp_path / 'unused', pipeline='baseline', teacher_path=broken)
    assert_refused_before_work(tmp_path, capsys, argv, '--teacher_path', f'bytes for tensor {name}')
