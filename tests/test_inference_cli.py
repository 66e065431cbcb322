"""The inference CLI (python research_inference.py MODEL_DIR "text" ...) on damaged model folders and empty
texts: exit 2 with one paragraph naming the file and the fix, never a traceback; an empty text gets no labels."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, fast_args, run_cli
# Imported at collection, not under a test's capsys: transformers' log handler keeps the stderr it first saw
from research_inference import main as inference_main


@pytest.fixture(scope='module')
def onnx_model(tmp_path_factory, teacher_checkpoint):
    """An int8 ONNX stage exported by a quant_only run (dynamic quantization: nothing trains)."""
    out = tmp_path_factory.mktemp('onnx_run')
    assert run_cli(fast_args(out, pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                             cache_dir=tmp_path_factory.mktemp('onnx_cache'), quant_method='dynamic')) == 0
    folder = os.path.join(str(out), 'stages', 'quant')
    assert json.load(open(os.path.join(folder, 'compression_info.json')))['format'] == 'onnx'
    return folder


def damaged_copy(tmp_path, source, name, damage):
    folder = tmp_path / 'model'
    shutil.copytree(source, folder)
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))
    return str(folder), str(path)


def cut_short(data):
    return data[:len(data) // 2]


def cli(capsys, *argv):
    code = inference_main(list(argv))
    return code, capsys.readouterr()


def assert_refused(code, captured, *fragments):
    assert code == 2, captured.err
    assert 'Traceback' not in captured.err, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and captured.err.rstrip().endswith(errors[0]), captured.err   # one paragraph, last
    for fragment in fragments:
        assert fragment in errors[0], captured.err


@pytest.mark.parametrize('name, damage, expected', [
    ('model.onnx', cut_short, 'cannot be loaded (InvalidProtobuf'),
    ('model.onnx', lambda data: b'not a model at all', 'cannot be loaded'),
    ('compression_info.json', cut_short, 'cannot be read (JSONDecodeError'),
    ('compression_info.json', lambda data: b'["a list"]', 'lacks format, label_names, max_length'),
], ids=['onnx_truncated', 'onnx_garbage', 'info_truncated', 'info_not_an_object'])
def test_a_damaged_onnx_folder_is_refused_naming_the_file(tmp_path, capsys, onnx_model, name, damage, expected):
    folder, path = damaged_copy(tmp_path, onnx_model, name, damage)
    assert_refused(*cli(capsys, folder, 'text'), f"'{path}'", expected, 'export it again')


@pytest.mark.parametrize('name, damage, expected', [
    ('model.safetensors', cut_short, 'cannot be loaded'),
    ('compression_info.json', lambda data: json.dumps({'format': 'hf'}).encode(), 'lacks label_names, max_length'),
    ('tokenizer.json', cut_short, 'cannot be loaded'),
], ids=['weights_truncated', 'info_without_labels', 'tokenizer_truncated'])
def test_a_damaged_pytorch_folder_is_refused_naming_the_file(tmp_path, capsys, teacher_checkpoint, name, damage,
                                                             expected):
    folder, path = damaged_copy(tmp_path, teacher_checkpoint, name, damage)
    assert_refused(*cli(capsys, folder, 'text'), f"'{path}'", expected)


@pytest.mark.parametrize('text', ['', '   ', '\n'], ids=['empty', 'spaces', 'newline'])
def test_an_empty_text_gets_no_labels_and_a_note(capsys, teacher_checkpoint, text):
    code, captured = cli(capsys, teacher_checkpoint, text, 'তুই একটা বাজে লোক')
    assert code == 0
    empty, real = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert empty['labels'] == [] and empty['probabilities'] == {} and 'empty text' in empty['note']
    assert set(real['probabilities']) == {'bully', 'sexual', 'religious', 'threat', 'spam'} and 'note' not in real


def test_the_process_exits_2_without_a_traceback_on_a_truncated_onnx(tmp_path, onnx_model):
    folder, path = damaged_copy(tmp_path, onnx_model, 'model.onnx', cut_short)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'research_inference.py'), folder, 'text'],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and path in proc.stderr, proc.stderr


def test_a_stage_the_run_did_not_keep_is_named_with_the_way_to_keep_it(tmp_path, capsys):
    """`stages/kd` of a run without --save_all_stages: the message names the stages the run kept and the flag."""
    kept = tmp_path / 'stages' / 'quant'
    kept.mkdir(parents=True)
    (kept / 'compression_info.json').write_text(json.dumps({'stage': 'quant'}), encoding='utf-8')
    assert inference_main(['predict', str(tmp_path / 'stages' / 'kd'), 'x']) == 2
    err = capsys.readouterr().err
    assert 'kept only quant' in err and '--save_all_stages' in err
