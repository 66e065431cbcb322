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
    settings = {'output_dir': tmp_path / 'out', 'pipeline': 'baseline', 'teacher_path': tiny_teacher_dir,
                'cache_dir': tmp_path / 'cache', **overrides}
    return fast_args(settings.pop('output_dir'), **settings)


EARLIER_RUN = {'config.json': '{"tool": "research_compression", "pipeline": "baseline"}',
               'results_final.json': '{"stages": []}', 'run.log': 'an earlier run\n',
               'stages/baseline/model.safetensors': 'weights'}


def make_earlier_run(out):
    for name, text in EARLIER_RUN.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), 'w') as fh:
            fh.write(text)


def snapshot(folder):
    """Every path under `folder` with its content (None for folders)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            found[os.path.relpath(os.path.join(root, name), folder)] = open(os.path.join(root, name), 'rb').read()
    return found


def csv_with(tmp_path, change):
    frame = sample_frame()
    frame = change(frame)
    return write_csv(tmp_path / 'd.csv', frame)


def set_column(frame, column, values):
    frame[column] = values
    return frame


def one_positive(frame, column):
    frame[column] = 0
    frame.loc[5, column] = 1
    return frame


def unwritable_folder(tmp_path):
    """A folder nothing can be created in, for root too (sysfs), or a read-only folder for other users."""
    if os.geteuid() != 0:
        locked = tmp_path / 'locked'
        locked.mkdir()
        os.chmod(locked, 0o500)
        return str(locked / 'out')
    if not os.path.isdir('/sys') or os.access('/sys/class', os.W_OK) and not os.path.ismount('/sys'):
        pytest.skip('no folder here that root cannot write to')
    return '/sys/research-compression-test/out'


def raise_permission_error(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', str(args[0]) if args else 'file')


# (case, expected fragment of the message, how to build the arguments: tmp_path, teacher dir -> overrides).
# Overrides are CLI settings; '_argv' adds raw arguments; '_patch' monkeypatches (module attribute, value).
BAD_INPUTS = [
    # the dataset file
    ('missing_file', 'does not exist', lambda t, d: {'dataset_path': t / 'nope.csv'}),
    ('dataset_is_a_folder', 'is a folder, not a CSV file', lambda t, d: {'dataset_path': t}),
    ('unreadable_csv', 'Could not read the dataset file', lambda t, d: {'_patch': ('research_data.pd.read_csv', raise_permission_error)}),
    ('empty_file', 'Could not read', lambda t, d: {'dataset_path': write_bytes(t / 'e.csv', b'')}),
    ('binary_file', 'Could not read', lambda t, d: {'dataset_path': write_bytes(t / 'b.csv', b'comment,bully\n\xff\xfe\xfa\xc3,1\n' * 50)}),
    # columns and labels
    ('missing_text_column', "Text column 'comment' is not in", lambda t, d: {'dataset_path': csv_with(t, lambda f: f.rename(columns={'comment': 'text'}))}),
    ('missing_label_column', 'Label column(s) threat not in', lambda t, d: {'dataset_path': csv_with(t, lambda f: f.drop(columns=['threat']))}),
    ('non_binary_labels', 'must hold only 0 and 1', lambda t, d: {'dataset_path': csv_with(t, lambda f: f.replace({'bully': {1: 2}}))}),
    ('text_labels', 'must hold only 0 and 1', lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'spam', 'yes'))}),
    ('missing_labels', 'must hold only 0 and 1', lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'sexual', None))}),
    ('numeric_text_column', "Text column 'id' holds only numbers", lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'id', range(len(f)))), 'text_column': 'id'}),
    ('text_column_is_a_label', "--text_column 'bully' is also in --label_columns", lambda t, d: {'text_column': 'bully'}),
    ('duplicate_label_columns', '--label_columns names bully more than once', lambda t, d: {'label_columns': 'bully,bully'}),
    ('empty_after_cleaning', 'No rows with a non-empty', lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'comment', '   '))}),
    ('all_zero_label', "Label 'spam' is never positive", lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'spam', 0))}),
    ('all_one_label', "Label 'threat' is never negative", lambda t, d: {'dataset_path': csv_with(t, lambda f: set_column(f, 'threat', 1))}),
    ('label_positive_once', 'has no positive text for label(s) religious', lambda t, d: {'dataset_path': csv_with(t, lambda f: one_positive(f, 'religious'))}),
    # splits
    ('too_few_rows', 'too few for 5 fold(s)', lambda t, d: {'dataset_path': csv_with(t, lambda f: f.head(6)), 'num_folds': 5}),
    ('twelve_rows_five_folds', 'validation split (test fold 1/5: 1 text)', lambda t, d: {'dataset_path': csv_with(t, lambda f: f.head(12)), 'num_folds': 5}),
    ('data_fraction_tiny', '--data_fraction 0.001 keeps 0 of the', lambda t, d: {'data_fraction': 0.001}),
    ('data_fraction_zero', '--data_fraction must be in (0, 1]', lambda t, d: {'data_fraction': 0}),
    ('data_fraction_above_one', '--data_fraction must be in (0, 1]', lambda t, d: {'data_fraction': 1.5}),
    ('val_fraction_too_big', '--val_fraction must be in (0, 0.5)', lambda t, d: {'val_fraction': 0.6}),
    ('zero_folds', '--num_folds must be at least 1', lambda t, d: {'num_folds': 0}),
    ('eval_fold_too_big', '--eval_fold must be in [0, 4]', lambda t, d: {'num_folds': 5, 'eval_fold': 7}),
    ('eval_fold_negative', '--eval_fold must be at least 0', lambda t, d: {'num_folds': 5, 'eval_fold': -1}),
    # sequence length
    ('max_length_tiny', '--max_length must be at least 8', lambda t, d: {'max_length': 4}),
    ('max_length_above_positions', '--max_length 100000 is more than the 128 tokens', lambda t, d: {'max_length': 100000}),
    ('max_length_above_student_positions', "--max_length 100 is more than the 64 tokens the model of --student_path",
     lambda t, d: {'max_length': 100, 'pipeline': 'kd_only', 'student_path': model_with_positions(t, d, 64)}),
    # training numbers
    ('zero_batch', '--batch must be at least 1', lambda t, d: {'batch': 0}),
    ('zero_latency_batch', '--latency_batch_size must be at least 1', lambda t, d: {'latency_batch_size': 0}),
    ('zero_latency_runs', '--latency_runs must be at least 1', lambda t, d: {'latency_runs': 0}),
    ('zero_accumulation', '--gradient_accumulation_steps must be at least 1', lambda t, d: {'gradient_accumulation_steps': 0}),
    ('zero_teacher_epochs', '--teacher_epochs must be at least 1', lambda t, d: {'teacher_epochs': 0}),
    ('zero_student_epochs', '--epochs must be at least 1', lambda t, d: {'epochs': 0, 'pipeline': 'kd_only', 'student_layers': 2}),
    ('zero_fine_tune_epochs', '--fine_tune_epochs must be at least 1 to fine-tune after pruning', lambda t, d: {'fine_tune_epochs': 0, 'pipeline': 'prune_only'}),
    ('qat_without_epochs', '--quant_method qat fine-tunes', lambda t, d: {'fine_tune_epochs': 0, 'pipeline': 'quant_only', 'quant_method': 'qat'}),
    ('zero_learning_rate', '--lr must be positive', lambda t, d: {'lr': 0}),
    ('negative_fine_tune_lr', '--fine_tune_lr must be positive', lambda t, d: {'fine_tune_lr': -1}),
    ('warmup_above_one', '--warmup_ratio must be in [0, 1)', lambda t, d: {'warmup_ratio': 1.5}),
    ('negative_weight_decay', '--weight_decay must be 0 or more', lambda t, d: {'weight_decay': -0.1}),
    ('negative_clip_norm', '--gradient_clip_norm must be 0 or more', lambda t, d: {'gradient_clip_norm': -1}),
    ('dropout_one', '--dropout must be in [0, 1)', lambda t, d: {'dropout': 1.0}),
    ('zero_patience', '--early_stopping_patience must be at least 1', lambda t, d: {'early_stopping_patience': 0}),
    ('threshold_above_one', '--threshold must be in (0, 1)', lambda t, d: {'threshold': 1.5}),
    # techniques
    ('kd_alpha_above_one', '--kd_alpha must be in [0, 1]', lambda t, d: {'kd_alpha': 1.5, 'pipeline': 'kd_only', 'student_layers': 2}),
    ('zero_temperature', '--kd_temperature must be positive', lambda t, d: {'kd_temperature': 0, 'pipeline': 'kd_only', 'student_layers': 2}),
    ('student_deeper_than_teacher', '--student_layers 10 must keep between 1 and 4', lambda t, d: {'student_layers': 10, 'pipeline': 'kd_only'}),
    ('student_layers_not_a_number', '--student_layers must be a number', lambda t, d: {'student_layers': 'abc', 'pipeline': 'kd_only'}),
    ('layer_map_garbage', '--kd_layer_map must be comma-separated student:teacher pairs', lambda t, d: {'kd_layer_map': '0-1', 'pipeline': 'kd_only', 'student_layers': 2, 'kd_method': 'hidden'}),
    ('sparsity_above_one', '--prune_sparsity must be in (0, 1)', lambda t, d: {'prune_sparsity': 1.5, 'pipeline': 'prune_only'}),
    ('structured_all_layers', '--prune_method structured removes attention heads', lambda t, d: {'prune_method': 'structured', 'prune_layers': 'all', 'pipeline': 'prune_only'}),
    ('gradual_without_fine_tuning', '--prune_method gradual prunes while fine-tuning', lambda t, d: {'prune_method': 'gradual', 'pipeline': 'prune_only', 'no_fine_tune_after_prune': True}),
    ('dtype_of_another_method', '--quant_dtype int8 does not fit --quant_method fp16', lambda t, d: {'quant_method': 'fp16', 'quant_dtype': 'int8', 'pipeline': 'quant_only'}),
    ('unknown_pipeline', "Unknown pipeline 'kd_everything'", lambda t, d: {'_argv': ['--pipeline', 'kd_everything']}),
    ('unknown_ablation_pipeline', 'Unknown pipeline(s) in --ablation_pipelines: nope', lambda t, d: {'run_ablation': True, 'ablation_pipelines': 'baseline,nope'}),
    ('seeds_not_numbers', '--seeds takes int values', lambda t, d: {'seeds': 'a,b'}),
    # models
    ('teacher_folder_missing', "--teacher_path '", lambda t, d: {'teacher_path': str(t / 'no_such_model')}),
    ('teacher_folder_without_weights', 'has no weights (model.safetensors', lambda t, d: {'teacher_path': model_without_weights(t, d)}),
    # folders
    ('output_dir_is_a_file', "--output_dir '", lambda t, d: {'output_dir': write_bytes(t / 'a_file', b'x')}),
    ('output_dir_below_a_file', 'is a file, not a folder', lambda t, d: {'output_dir': os.path.join(write_bytes(t / 'f', b'x'), 'out')}),
    ('output_dir_unwritable', 'cannot be written', lambda t, d: {'output_dir': unwritable_folder(t)}),
    ('cache_dir_is_a_file', "--cache_dir '", lambda t, d: {'cache_dir': write_bytes(t / 'cache_file', b'x')}),
    ('cache_dir_below_a_file', 'cannot be created', lambda t, d: {'cache_dir': os.path.join(write_bytes(t / 'g', b'x'), 'cache')}),
    ('negative_prune_age', '--cache_prune_older_than must be 0 or more', lambda t, d: {'cache_prune_older_than': -1}),
    # argparse (usage line + error)
    ('batch_not_a_number', "argument --batch: invalid int value: 'abc'", lambda t, d: {'batch': 'abc'}),
    ('unknown_quant_method', "argument --quant_method: invalid choice: 'int3'", lambda t, d: {'quant_method': 'int3'}),
]


def write_bytes(path, data):
    with open(path, 'wb') as fh:
        fh.write(data)
    return str(path)


def model_with_positions(tmp_path, teacher_dir, positions):
    """A copy of the model whose config takes only `positions` tokens (validation reads the config alone)."""
    import json
    import shutil
    folder = tmp_path / 'short_model'
    shutil.copytree(teacher_dir, folder)
    config = json.load(open(folder / 'config.json'))
    json.dump({**config, 'max_position_embeddings': positions}, open(folder / 'config.json', 'w'))
    return str(folder)


def model_without_weights(tmp_path, teacher_dir):
    import shutil
    folder = tmp_path / 'incomplete'
    shutil.copytree(teacher_dir, folder)
    for name in os.listdir(folder):
        if name.endswith(('.safetensors', '.bin')):
            os.remove(folder / name)
    return str(folder)


@pytest.mark.parametrize('case, expected, build', BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_paragraph_before_anything_moves(tmp_path, capsys, monkeypatch, tiny_teacher_dir,
                                                                    case, expected, build):
    import transformers

    def no_training(*args, **kwargs):
        raise AssertionError('a model was trained before the settings were checked')
    monkeypatch.setattr(transformers.Trainer, 'train', no_training)
    out = tmp_path / 'out'
    make_earlier_run(out)
    before = snapshot(out)
    overrides = build(tmp_path, tiny_teacher_dir)
    extra = overrides.pop('_argv', [])
    if '_patch' in overrides:
        monkeypatch.setattr(*overrides.pop('_patch'))
    argv = args_for(tmp_path, tiny_teacher_dir, **overrides) + extra
    try:
        code = run_cli(argv)
    except SystemExit as exc:              # argparse's own errors: usage line, then the error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert 'Traceback' not in err and '\n\n' not in err.strip()     # one paragraph, no traceback
    assert snapshot(out) == before                                      # the earlier run is untouched
    assert not os.path.exists(out / 'previous_runs')


def test_at_least_40_distinct_bad_inputs_are_covered():
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS) >= 40


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
    assert code == 2 and 'has no weights (model.safetensors' in err


@pytest.mark.parametrize('split', ['training', 'validation', 'test'])
def test_a_label_without_a_positive_in_a_split_is_refused_by_name(split):
    import numpy as np
    from research_data import check_label_coverage
    from research_errors import UsageError
    labels = np.zeros((30, 2), dtype=np.float32)
    labels[::2, 0] = 1
    splits = {'training': np.arange(0, 20), 'validation': np.arange(20, 25), 'test': np.arange(25, 30)}
    labels[:, 1] = 0
    for name, idx in splits.items():
        if name != split:
            labels[idx[0], 1] = 1                        # 'threat' positive everywhere but in `split`
    with pytest.raises(UsageError) as exc:
        check_label_coverage(labels, ['bully', 'threat'], splits, fold=0, num_folds=5)
    message = str(exc.value)
    assert f'The {split} split (test fold 1/5' in message and 'label(s) threat' in message
    assert 'drop the label from --label_columns' in message and '--num_folds' in message and '--data_fraction' in message
