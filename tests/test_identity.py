"""A stored stage's identity is what its step reads: every stage kind's step runs on the tiny models behind a
recording proxy over the settings, and the test fails when the step reads a setting that can change its
result but is not in its identity (a stale stage would then be reused silently), or when its identity holds
a setting the step never reads (a change to it would rebuild the stage for nothing)."""

import os

import pytest

from conftest import SAMPLE_CSV, fast_args

from research_compression_config import LAUNCH_IDENTITY, STAGES, identity_fields, parse_compression_arguments, pipeline_settings
from research_settings import changes_result
from research_stages import StageNode


class RecordingSettings:
    """Settings that note the name of every setting read through them (copies made with `replace` too)."""

    def __init__(self, settings, reads):
        object.__setattr__(self, '_settings', settings)
        object.__setattr__(self, '_reads', reads)

    def __getattr__(self, name):
        self._reads.add(name)
        return getattr(self._settings, name)

    def replace(self, **changes):
        return RecordingSettings(self._settings.replace(**changes), self._reads)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, teacher_checkpoint):
    from research_data import prepare_data
    root = tmp_path_factory.mktemp('identity')
    data = prepare_data(SAMPLE_CSV, 'comment', ['bully', 'sexual', 'religious', 'threat', 'spam'], 1, 0, 1.0, 0.1, 42)
    teacher = StageNode('teacher', 'parent', teacher_checkpoint, {'linear_roles': None})
    return {'root': root, 'data': data, 'teacher': teacher, 'teacher_dir': tiny_teacher_dir,
            'student_dir': tiny_student_dir, 'checkpoint': teacher_checkpoint}


def settings_for(setup, kind, overrides):
    argv = fast_args(setup['root'] / 'out', pipeline='kd_prune_quant', teacher_path=setup['teacher_dir'],
                     cache_dir=setup['root'] / 'cache', **overrides)
    return pipeline_settings(parse_compression_arguments(argv), 'kd_prune_quant', 7)


def reads_of_step(setup, kind, overrides, name):
    """(what the step read that can change its result, its identity fields) for one variant."""
    from research_inference import load_trainable_model
    from research_models import linear_weight_roles
    settings = settings_for(setup, kind, overrides)
    parent = setup['teacher']
    if parent.meta['linear_roles'] is None:
        parent.meta['linear_roles'] = linear_weight_roles(load_trainable_model(parent.path)[0])
    reads = set()
    STAGES[kind].step(None if kind == 'teacher' else parent, setup['data'], RecordingSettings(settings, reads),
                      str(setup['root'] / name))
    return {r for r in reads if changes_result(r)}, set(identity_fields(settings, kind))


# Every stage kind, every method (the slow mark on the variants that train longest or export several files).
VARIANTS = [
    ('teacher', {}, False),
    ('teacher', {'teacher_checkpoint': 'CHECKPOINT'}, False),
    ('kd', {'student_layers': 2}, False),
    ('kd', {'student_layers': 2, 'kd_method': 'multi_level'}, True),
    ('kd', {'student_layers': 2, 'kd_method': 'hidden'}, True),
    ('kd', {'student_layers': 2, 'kd_method': 'attention'}, True),
    ('kd', {'student_path': 'STUDENT', 'trim_vocab': True}, True),
    ('prune', {'prune_method': 'magnitude'}, False),
    ('prune', {'prune_method': 'magnitude', 'no_fine_tune_after_prune': True}, False),
    ('prune', {'prune_method': 'wanda'}, True),
    ('prune', {'prune_method': 'gradual'}, True),
    ('prune', {'prune_method': 'structured'}, True),
    ('quant', {'quant_method': 'dynamic'}, False),
    ('quant', {'quant_method': 'static'}, True),
    ('quant', {'quant_method': 'qat'}, True),
    ('quant', {'quant_method': 'fp16'}, True),
    ('quant', {'quant_method': 'int4'}, True),
]


def variant_id(variant):
    kind, overrides, _ = variant
    return kind + '-' + '-'.join(f'{k}={v}' for k, v in overrides.items())


@pytest.mark.parametrize('variant', [pytest.param(v, marks=[pytest.mark.slow] if v[2] else [], id=variant_id(v))
                                     for v in VARIANTS])
def test_a_step_reads_exactly_its_identity(setup, variant):
    kind, overrides, _ = variant
    overrides = {k: {'CHECKPOINT': setup['checkpoint'], 'STUDENT': setup['student_dir']}.get(v, v)
                 for k, v in overrides.items()}
    read, identity = reads_of_step(setup, kind, overrides, variant_id(variant).replace('=', '_').replace('/', '_'))
    assert not read - identity, f'{kind} reads settings its identity lacks: {sorted(read - identity)}'
    identity -= set(LAUNCH_IDENTITY)   # the process count: read by the Trainer from the launch, not from settings
    assert not identity - read, f'{kind} identity holds settings its step never reads: {sorted(identity - read)}'


def test_deleting_a_declaration_is_caught(setup, monkeypatch):
    """The check above can fail: drop one setting from the prune step's declaration and the step's reads
    are no longer covered."""
    import research_compression_config as config
    declared = config.STAGES['prune'].reads
    monkeypatch.setitem(config.STAGES, 'prune', config.StageKind(
        'prune', config.STAGES['prune'].step, config.STAGES['prune'].validate, config.STAGES['prune'].describe,
        lambda s: tuple(n for n in declared(s) if n != 'prune_sparsity')))
    read, identity = reads_of_step(setup, 'prune', {'prune_method': 'magnitude', 'no_fine_tune_after_prune': True},
                                   'prune-missing')
    assert read - identity == {'prune_sparsity'}


def test_quantization_identity_ignores_fine_tuning_after_pruning(setup):
    """quant_only with --no_fine_tune_after_prune is the same quantized stage (the quantizer never reads it)."""
    plain = settings_for(setup, 'quant', {})
    other = settings_for(setup, 'quant', {'no_fine_tune_after_prune': True})
    assert identity_fields(plain, 'quant') == identity_fields(other, 'quant')
    assert 'fine_tune_after_prune' not in identity_fields(plain, 'quant')
    assert os.path.isdir(setup['checkpoint'])


def test_quant_only_reruns_nothing_without_fine_tuning_after_pruning(tmp_path, capsys, teacher_checkpoint):
    from conftest import run_cli
    common = dict(pipeline='quant_only', teacher_checkpoint=teacher_checkpoint, cache_dir=tmp_path / 'cache')
    assert run_cli(fast_args(tmp_path / 'a', **common)) == 0
    capsys.readouterr()
    assert run_cli(fast_args(tmp_path / 'b', no_fine_tune_after_prune=True, **common)) == 0
    assert '(0 stage(s) run' in capsys.readouterr().out
