"""The typed settings: today's flags and defaults unchanged, every numeric flag checked against its declared
range (nan and inf included) before any work, registries and declared choices in agreement, --help without
torch, and copies instead of mutation."""

import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT, fast_args, run_cli

import research_settings as rs
from research_options import base_type

# Every flag and its default as the argparse parser of the previous release declared them (lists as tuples).
PREVIOUS_DEFAULTS = {
    'dataset_path': None, 'author_name': None, 'pipeline': 'baseline', 'run_ablation': False,
    'ablation_pipelines': ('baseline', 'kd_only', 'prune_only', 'quant_only', 'kd_prune', 'kd_quant', 'prune_quant',
                           'kd_prune_quant'),
    'seeds': None, 'reuse_stages': True, 'progress_bars': True, 'text_column': 'comment',
    'label_columns': ('bully', 'sexual', 'religious', 'threat', 'spam'), 'max_length': 128, 'num_folds': 5,
    'eval_fold': 0, 'run_full_kfold': False, 'data_fraction': 1.0, 'val_fraction': 0.1, 'seed': 42,
    'cache_dir': './cache', 'teacher_path': 'csebuetnlp/banglabert', 'teacher_checkpoint': None, 'teacher_epochs': 10,
    'allow_teacher_split_mismatch': False, 'student_path': 'distilbert-base-multilingual-cased', 'student_layers': None,
    'trim_vocab': False, 'trim_vocab_min_count': 1, 'trim_vocab_keep': (), 'batch': 32, 'lr': 2e-05, 'epochs': 15,
    'warmup_ratio': 0.1, 'weight_decay': 0.01, 'gradient_clip_norm': 1.0, 'dropout': 0.1, 'early_stopping_patience': 5,
    'gradient_accumulation_steps': 1, 'mixed_precision': True, 'kd_alpha': 0.7, 'kd_temperature': 4.0,
    'kd_method': 'logit', 'hidden_loss_weight': 0.3, 'attention_loss_weight': 0.2, 'kd_layer_map': None,
    'prune_method': 'magnitude', 'prune_sparsity': 0.5, 'prune_schedule': 'cubic', 'prune_start_epoch': 0.0,
    'prune_end_epoch': None, 'prune_frequency': 10, 'prune_layers': 'encoder', 'calibration_samples': 512,
    'fine_tune_after_prune': True, 'fine_tune_epochs': 3, 'fine_tune_lr': None, 'quant_method': 'dynamic',
    'quant_dtype': None, 'quant_calibration_batches': 100, 'threshold': 0.5, 'latency_batch_size': 1,
    'latency_runs': 30, 'latency_threads': 1, 'latency_noise_bound': 0.15, 'measure_peak_memory': True,
    'output_dir': './compressed_models', 'save_all_stages': False, 'overwrite_output_dir': False,
    'report_to': ('none',), 'language': ('bn',), 'model_license': 'unknown', 'hub_dataset_id': None,
    'cache_report': False, 'cache_prune_older_than': None,
}
PREVIOUS_SWITCHES = {'--no_reuse_stages', '--progress_bars', '--no_progress_bars', '--no_mixed_precision',
                     '--fine_tune_after_prune', '--no_fine_tune_after_prune', '--no_peak_memory'}


def parsed(*extra):
    return vars(rs.build_argument_parser().parse_args(['--dataset_path', 'x', '--author_name', 'y', *extra]))


def test_every_previous_flag_keeps_its_default():
    defaults = {**parsed(), 'dataset_path': None, 'author_name': None}
    for name, default in PREVIOUS_DEFAULTS.items():
        assert defaults[name] == default, name
    flags = {f for a in rs.build_argument_parser()._actions for f in a.option_strings}
    assert PREVIOUS_SWITCHES <= flags
    assert {'--' + name for name in PREVIOUS_DEFAULTS if not isinstance(PREVIOUS_DEFAULTS[name], bool)} <= flags


def test_switches_and_comma_lists_parse_as_before():
    values = parsed('--no_reuse_stages', '--no_progress_bars', '--no_peak_memory', '--no_fine_tune_after_prune',
                    '--seeds', '1,2,3', '--label_columns', 'a, b', '--report_to', 'tensorboard')
    assert values['reuse_stages'] is False and values['progress_bars'] is False
    assert values['measure_peak_memory'] is False and values['fine_tune_after_prune'] is False
    assert values['seeds'] == (1, 2, 3) and values['label_columns'] == ('a', 'b')
    assert values['report_to'] == ('tensorboard',)


def test_help_shows_lists_comma_separated_and_ranges():
    text = ' '.join(rs.build_argument_parser().format_help().split())
    assert '(default: bully,sexual,religious,threat,spam)' in text and "['bully'" not in text
    assert 'Range: (0, 1).' in text          # --prune_sparsity, --threshold
    assert 'Range: >= 0.' in text            # --seed


def numeric_fields():
    for cls in rs.GROUPS:
        for f in dataclasses.fields(cls):
            item_type, is_list, _ = base_type(f.type)
            if item_type in (int, float):
                yield f, item_type, is_list


def bad_values(f, item_type):
    """nan/inf/-inf for a float, and a value just outside each declared bound."""
    meta, values = f.metadata, []
    if item_type is float:
        values += ['nan', 'inf', '-inf']
    step = 1 if item_type is int else 1e-3
    if meta['low'] is not None:
        values.append(str(meta['low'] if meta['low_open'] else meta['low'] - step))
    if meta['high'] is not None:
        values.append(str(meta['high'] if meta['high_open'] else meta['high'] + step))
    return values


CASES = [(f.name, value) for f, item_type, _ in numeric_fields() for value in bad_values(f, item_type)]


def test_every_numeric_flag_has_a_bound_or_is_a_float():
    assert len(CASES) >= 60
    unbounded = [f.name for f, item_type, _ in numeric_fields() if item_type is int and f.metadata['low'] is None]
    assert not unbounded, f'integer settings without a range: {unbounded}'


@pytest.mark.parametrize('name,value', CASES, ids=[f'{n}={v}' for n, v in CASES])
def test_a_value_outside_its_range_is_refused_before_any_work(tmp_path, capsys, name, value):
    from research_compression_config import parse_compression_arguments
    from research_errors import UsageError
    argv = fast_args(tmp_path / 'out', cache_dir=tmp_path / 'cache') + [f'--{name}={value}']
    with pytest.raises(UsageError) as refused:
        parse_compression_arguments(argv)
    assert f'--{name}' in str(refused.value) and 'must be' in str(refused.value)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()


def test_the_entry_point_exits_2_on_a_bad_number(tmp_path, capsys):
    assert run_cli(fast_args(tmp_path / 'out', lr='inf')) == 2
    assert '--lr must be a finite number' in capsys.readouterr().err


def test_declared_choices_are_the_registries():
    from research_kd import KD_METHODS
    from research_models import PRUNE_LAYER_GROUPS
    from research_pruning import PRUNE_METHODS, PRUNE_SCHEDULES
    from research_quantization import QUANT_DTYPES, QUANT_METHODS
    assert rs.KD_METHOD_NAMES == tuple(KD_METHODS)
    assert rs.PRUNE_METHOD_NAMES == tuple(PRUNE_METHODS) and rs.PRUNE_SCHEDULE_NAMES == tuple(PRUNE_SCHEDULES)
    assert rs.PRUNE_LAYER_GROUP_NAMES == tuple(PRUNE_LAYER_GROUPS)
    assert rs.QUANT_METHOD_NAMES == tuple(QUANT_METHODS) and set(rs.QUANT_DTYPE_NAMES) == set(QUANT_DTYPES)


def test_help_needs_neither_torch_nor_transformers():
    code = ('import runpy, sys\nsys.argv = ["research_main.py", "--help"]\n'
            'try:\n    runpy.run_path("research_main.py", run_name="__main__")\nexcept SystemExit as e:\n'
            '    assert e.code == 0\nprint("HEAVY", sorted(m for m in ("torch", "transformers") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert 'usage: research_main.py' in out and 'HEAVY []' in out


def test_settings_are_copied_never_changed_in_place():
    settings = rs.default_settings()
    with pytest.raises(AttributeError):
        settings.kd_alpha = 0.1
    changed = settings.replace(kd_alpha=0.1, train_seed=3)
    assert (settings.kd_alpha, changed.kd_alpha, changed.train_seed) == (0.7, 0.1, 3)
    with pytest.raises(AttributeError):
        settings.replace(no_such_setting=1)


def test_a_setting_name_belongs_to_one_group():
    names = [f.name for cls in rs.GROUPS + (rs.RunContext,) for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) and set(rs.FIELD_OWNER) == set(names)


@pytest.mark.parametrize('value', [',', '1,1', '-1,2', 'two', '0'])
def test_a_student_without_layers_is_refused(tmp_path, value):
    from research_kd import parse_student_layers
    from research_errors import UsageError
    with pytest.raises(UsageError, match='--student_layers'):
        parse_student_layers(value)
