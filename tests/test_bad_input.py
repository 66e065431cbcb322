"""Bad input exits with code 2 and a one-paragraph message naming the fix - never a traceback."""

import os

import pandas as pd
import pytest

from conftest import SAMPLE_CSV, fast_args, run_cli


def write_csv(path, frame):
    frame.to_csv(path, index=False)
    return str(path)


def sample_frame():
    return pd.read_csv(SAMPLE_CSV)


def run_and_capture(capsys, argv):
    code = run_cli(argv)
    captured = capsys.readouterr()
    return code, captured.err


def args_for(tmp_path, tiny_teacher_dir, **overrides):
    return fast_args(tmp_path / 'out', pipeline='baseline', teacher_path=tiny_teacher_dir, cache_dir=tmp_path / 'cache',
                     **overrides)


@pytest.mark.parametrize('case, expected', [
    ('missing_file', 'does not exist'),
    ('missing_text_column', "Text column 'comment' is not in"),
    ('missing_label_column', 'Label column(s) threat not in'),
    ('non_binary_labels', "must hold only 0 and 1"),
    ('empty_after_cleaning', 'No rows with a non-empty'),
    ('too_few_rows', 'too few for 5 fold(s)'),
    ('unknown_pipeline', "Unknown pipeline 'kd_everything'"),
])
def test_bad_input_exits_2_with_message(tmp_path, capsys, tiny_teacher_dir, case, expected):
    frame = sample_frame()
    overrides = {}
    if case == 'missing_file':
        overrides['dataset_path'] = str(tmp_path / 'nope.csv')
    elif case == 'missing_text_column':
        overrides['dataset_path'] = write_csv(tmp_path / 'd.csv', frame.rename(columns={'comment': 'text'}))
    elif case == 'missing_label_column':
        overrides['dataset_path'] = write_csv(tmp_path / 'd.csv', frame.drop(columns=['threat']))
    elif case == 'non_binary_labels':
        frame.loc[3, 'bully'] = 2
        overrides['dataset_path'] = write_csv(tmp_path / 'd.csv', frame)
    elif case == 'empty_after_cleaning':
        frame['comment'] = '   '
        overrides['dataset_path'] = write_csv(tmp_path / 'd.csv', frame)
    elif case == 'too_few_rows':
        overrides['dataset_path'] = write_csv(tmp_path / 'd.csv', frame.head(6))
        overrides['num_folds'] = 5
    argv = args_for(tmp_path, tiny_teacher_dir, **overrides)
    if case == 'unknown_pipeline':
        argv += ['--pipeline', 'kd_everything']  # the last occurrence wins in argparse
    code, err = run_and_capture(capsys, argv)
    assert code == 2
    assert expected in err
    assert 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'out' / 'results_final.json')


def test_cli_process_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, 'research_main.py'), '--dataset_path', str(tmp_path / 'x.csv'),
                           '--author_name', 't', '--output_dir', str(tmp_path / 'o')], capture_output=True, text=True)
    assert proc.returncode == 2
    assert 'does not exist' in proc.stderr and 'Traceback' not in proc.stderr


def test_checkpoint_without_trained_head_is_refused(tmp_path, capsys, tiny_teacher_dir):
    # tiny_teacher_dir is a bare encoder: loading it as a checkpoint would invent a random head.
    code, err = run_and_capture(capsys, fast_args(tmp_path / 'out', pipeline='baseline', teacher_checkpoint=tiny_teacher_dir,
                                                  cache_dir=tmp_path / 'cache'))
    assert code == 2 and 'no trained classification head' in err


def test_checkpoint_is_loaded_with_its_trained_head(teacher_checkpoint):
    import torch
    from safetensors.torch import load_file
    from research_models import load_fine_tuned_classifier
    model, _ = load_fine_tuned_classifier(teacher_checkpoint, ['bully', 'sexual', 'religious', 'threat', 'spam'])
    saved = load_file(os.path.join(teacher_checkpoint, 'model.safetensors'))
    assert torch.equal(model.classifier.weight, saved['classifier.weight'])


def test_a_16_bit_checkpoint_is_loaded_as_fp32_for_training(teacher_checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from research_models import load_fine_tuned_classifier
    half_dir = str(tmp_path / 'half')
    AutoModelForSequenceClassification.from_pretrained(teacher_checkpoint).to(torch.bfloat16).save_pretrained(half_dir)
    AutoTokenizer.from_pretrained(teacher_checkpoint).save_pretrained(half_dir)
    model, _ = load_fine_tuned_classifier(half_dir, ['bully', 'sexual', 'religious', 'threat', 'spam'])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_foreign_non_empty_output_dir_is_refused(tmp_path, capsys, tiny_teacher_dir):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'thesis.tex').write_text('precious')
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir))
    assert code == 2 and '--overwrite_output_dir' in err
    assert (out / 'thesis.tex').read_text() == 'precious'


def test_earlier_run_is_archived_not_overwritten(tmp_path, teacher_checkpoint):
    argv = fast_args(tmp_path / 'out', pipeline='baseline', teacher_checkpoint=teacher_checkpoint, cache_dir=tmp_path / 'c')
    assert run_cli(argv) == 0
    first = (tmp_path / 'out' / 'results_final.json').read_text()
    assert run_cli(argv) == 0
    archived = list((tmp_path / 'out' / 'previous_runs').glob('*/results_final.json'))
    assert len(archived) == 1 and archived[0].read_text() == first


def test_unknown_method_is_an_argparse_error(tmp_path, tiny_teacher_dir):
    with pytest.raises(SystemExit) as exc:
        run_cli(args_for(tmp_path, tiny_teacher_dir, quant_method='int3'))
    assert exc.value.code == 2


def test_teacher_checkpoint_from_another_split_is_refused(tmp_path, capsys, teacher_checkpoint):
    """The tiny teacher was fine-tuned on --num_folds 1 --seed 42; another seed puts its training texts in test."""
    argv = fast_args(tmp_path / 'out', pipeline='baseline', teacher_checkpoint=teacher_checkpoint,
                     cache_dir=tmp_path / 'c', seed=5)
    code, err = run_and_capture(capsys, argv)
    assert code == 2 and 'has seen some of this run' in err
    assert run_cli(argv + ['--allow_teacher_split_mismatch', '--output_dir', str(tmp_path / 'o2')]) == 0


def test_bad_dataset_leaves_an_earlier_run_in_place(tmp_path, capsys, tiny_teacher_dir):
    assert run_cli(args_for(tmp_path, tiny_teacher_dir, teacher_epochs=1)) == 0
    before = sorted(os.listdir(tmp_path / 'out'))
    code, err = run_and_capture(capsys, args_for(tmp_path, tiny_teacher_dir, dataset_path=tmp_path / 'typo.csv'))
    assert code == 2 and 'does not exist' in err
    assert sorted(os.listdir(tmp_path / 'out')) == before and 'previous_runs' not in before


def test_model_folder_without_weights_exits_2(tmp_path, capsys, tiny_teacher_dir):
    import shutil
    folder = tmp_path / 'incomplete'
    shutil.copytree(tiny_teacher_dir, folder)
    for name in os.listdir(folder):
        if name.endswith(('.safetensors', '.bin')):
            os.remove(folder / name)
    code, err = run_and_capture(capsys, args_for(tmp_path, str(folder)))
    assert code == 2 and 'needs config.json, the weights' in err
