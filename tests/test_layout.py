"""The code's shape: modules form a graph without cycles, project imports sit at module level, pipelines and
methods are data (a ninth pipeline is one entry), and every bad setting is refused before any training."""

import ast
import glob
import os

import pytest

from conftest import ROOT, fast_args, run_cli


def project_imports():
    """module -> (project modules it imports at module level, project imports inside functions)."""
    modules = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, 'research_*.py'))}
    graph, nested = {}, {}
    for name, path in modules.items():
        tree = ast.parse(open(path, encoding='utf-8').read())
        top, inner = set(), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or '']
                found = [t for t in targets if t in modules]
                if node.col_offset == 0:
                    top.update(found)
                else:
                    inner += found
        graph[name], nested[name] = top, inner
    return graph, nested


def test_modules_form_a_graph_without_cycles_and_import_at_module_level():
    graph, nested = project_imports()
    assert len(graph) >= 12
    visiting, done = set(), set()

    def visit(module, path):
        assert module not in visiting, f'import cycle: {" -> ".join(path + [module])}'
        if module in done:
            return
        visiting.add(module)
        for target in graph[module]:
            visit(target, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
    assert sum(len(v) for v in nested.values()) <= 4, nested
    # the store knows no domain module (a full disk is recognised by research_faults, which knows none either)
    assert graph['research_stages'] <= {'research_errors', 'research_files', 'research_faults', 'research_stage_locks'}
    assert graph['research_stage_locks'] <= {'research_files'}                  # the store's locks
    assert graph['research_faults'] <= {'research_errors', 'research_files'}
    assert graph['research_files'] == set()                                   # file integrity: a leaf


def test_pipeline_names_appear_only_in_the_configuration():
    names = ['kd_prune_quant', 'prune_quant', 'kd_quant', 'quant_only', 'prune_only', 'kd_only']
    for path in glob.glob(os.path.join(ROOT, 'research_*.py')):
        if path.endswith('research_pipelines.py'):   # PIPELINE_CONFIGS, the table's home
            continue
        text = open(path, encoding='utf-8').read()
        assert not [n for n in names if f"'{n}'" in text], path


def test_a_ninth_pipeline_is_one_entry(tmp_path, teacher_checkpoint, monkeypatch):
    import json
    import research_compression_config as config
    monkeypatch.setitem(config.PIPELINE_CONFIGS, 'prune_only_structured',
                        config.Pipeline(('prune',), 'Prune the teacher structurally', {'prune_method': 'structured'}))
    code = run_cli(fast_args(tmp_path / 'out', pipeline='prune_only_structured', teacher_checkpoint=teacher_checkpoint,
                             cache_dir=tmp_path / 'cache', calibration_samples=32))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, pruned = json.load(fh)['stages']
    assert pruned['prune_method'] == 'structured'                   # the pipeline's own setting won
    assert 'Pruning:  structured' in (tmp_path / 'out' / 'run.log').read_text(encoding='utf-8')   # and is printed
    assert pruned['params_total'] < baseline['params_total']          # heads/neurons really removed
    with open(os.path.join(pruned['model_dir'], 'compression_info.json'), encoding='utf-8') as fh:
        assert json.load(fh)['format'] == 'hf_structured'


def test_student_deeper_than_the_teacher_is_refused_before_any_training(tmp_path, capsys, tiny_teacher_dir, monkeypatch):
    import transformers

    def no_training(*args, **kwargs):
        raise AssertionError('a model was trained before the settings were checked')
    monkeypatch.setattr(transformers.Trainer, 'train', no_training)
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=10,
                             cache_dir=tmp_path / 'cache'))
    assert code == 2
    err = capsys.readouterr().err
    assert '--student_layers 10' in err and 'the teacher has 4' in err
    assert not (tmp_path / 'out').exists()                           # nothing written, nothing archived


def test_help_lists_the_progress_bar_switch(capsys):
    from research_compression_config import build_argument_parser
    text = build_argument_parser().format_help()
    assert '--progress_bars' in text and '--no_progress_bars' in text
    assert parse_quiet(['--no_progress_bars']).progress_bars is False and parse_quiet([]).progress_bars is True


def parse_quiet(extra):
    from research_compression_config import build_argument_parser
    return build_argument_parser().parse_args(['--dataset_path', 'x', '--author_name', 'y', *extra])


def test_settings_per_pipeline_and_seed_are_copies(tmp_path):
    from research_compression_config import parse_compression_arguments, pipeline_settings
    args = parse_compression_arguments(fast_args(tmp_path / 'out', seeds='1,2', pipeline='kd_only'))
    before = args.as_dict()
    settings = pipeline_settings(args, 'kd_only', 2)
    assert settings.train_seed == 2 and args.as_dict() == before and args.train_seed == 1
