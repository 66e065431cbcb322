"""`research_inference.py score`: a file of comments scored by a saved stage folder of every CPU format gives the
probabilities of `predict`, row for row in input order (also when the file spans several chunks); empty texts
keep their rows; CSV, JSONL, plain text and stdin/stdout; per-label thresholds; every bad input exits 2 with
no output file left. `predict` keeps its old form, and both commands have --help."""

import copy
import io
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import LABELS, sample_texts
from test_quantization import build_setup, one_torch_thread, quantize_case

# case -> (--quant_method, --quant_dtype) of test_quantization, or None for a PyTorch folder made here
FORMAT_CASES = {'fp32': None, 'structured': None, 'fp16': ('fp16', 'fp16'), 'dynamic': ('dynamic', None),
                'static': ('static', None), 'int4': ('int4', 'int4')}
TEXTS = sample_texts()[:23] + ['', '   ', 'আজকের খেলা দারুণ হয়েছে ' * 40]   # empty, blank, longer than max_length


@pytest.fixture(scope='module')
def setup(tmp_path_factory, teacher_checkpoint):
    return build_setup(tmp_path_factory.mktemp('score'), teacher_checkpoint, quant_calibration_batches=4)


@pytest.fixture(scope='module')
def folders(setup):
    """Case -> a saved stage folder of that format."""
    with one_torch_thread():
        result = {'fp32': setup['fp32_dir'], 'structured': structured_folder(setup)}
        for case, methods in FORMAT_CASES.items():
            if methods:
                result[case] = quantize_case(setup, case, *methods)[0]
    return result


def structured_folder(setup):
    from research_data import calibration_batches
    from research_inference import read_info, save_hf
    from research_pruning import apply_structured_pruning
    args = setup['args'].replace(prune_method='structured', prune_layers='encoder', prune_sparsity=0.5)
    batches = calibration_batches(setup['splits'].train, setup['tokenizer'], 32, 16, seed=0)
    model, _ = apply_structured_pruning(copy.deepcopy(setup['model']), args, batches)
    folder = str(setup['root'] / 'structured')
    save_hf(folder, model, setup['tokenizer'], setup['info'])
    assert read_info(folder)['format'] == 'hf_structured'
    return folder


def score(*argv):
    from research_inference import main
    return main(['score', *map(str, argv), '--no_progress'])


def write_csv(path, texts):
    pd.DataFrame({'id': [f'r{i}' for i in range(len(texts))], 'comment': texts, 'note': 'x'}).to_csv(path, index=False)
    return path


def probability_matrix(frame):
    return frame[[f'prob_{n}' for n in LABELS]].to_numpy(dtype=np.float64)


def reference(folder, texts):
    """`predict` one text at a time (no padding, no batching): NaN rows for the empty texts."""
    from research_inference import load_compressed_model
    model = load_compressed_model(folder)
    rows = [[model.predict([t], batch_size=1)[0][n] for n in LABELS] if t.strip() else [np.nan] * len(LABELS)
            for t in texts]
    return np.asarray(rows)


@pytest.mark.parametrize('case', list(FORMAT_CASES))
def test_score_gives_the_probabilities_of_predict_in_input_order(folders, case, tmp_path):
    """Batches of 4 sorted by length inside chunks of 7 rows (the file spans 4 chunks) give every row the
    probabilities `predict` gives that text alone. Dynamic int8 quantizes activations per batch and fp16
    rounds padded sums differently (1.5e-5 apart here), so their probabilities depend on which texts share a
    batch: compared at batch size 1 (order and chunking still tested)."""
    source = write_csv(tmp_path / 'in.csv', TEXTS)
    batch = 1 if case in ('dynamic', 'fp16') else 4
    with one_torch_thread():
        assert score(folders[case], '--input', source, '--output', tmp_path / 'out.csv', '--batch_size', batch,
                     '--chunk_size', 7) == 0
        expected = reference(folders[case], TEXTS)
    out = pd.read_csv(tmp_path / 'out.csv', dtype={'id': str, 'comment': str}, keep_default_na=False,
                      na_values={f'prob_{n}': [''] for n in LABELS})
    assert out['id'].tolist() == [f'r{i}' for i in range(len(TEXTS))]
    assert list(out.columns[:3]) == ['id', 'comment', 'note']
    np.testing.assert_allclose(probability_matrix(out), expected, atol=1e-5, rtol=0)


def test_empty_texts_keep_their_rows_and_are_counted(folders, tmp_path, capsys):
    source = write_csv(tmp_path / 'in.csv', ['', 'তুই একটা বেয়াদব', '  ', 'ঘরে বসে আয় করুন'])
    assert score(folders['fp32'], '--input', source, '--output', tmp_path / 'out.csv') == 0
    out = pd.read_csv(tmp_path / 'out.csv', keep_default_na=False, dtype=str)
    assert out['id'].tolist() == ['r0', 'r1', 'r2', 'r3']
    assert [row == '' for row in out['prob_bully']] == [True, False, True, False]
    assert out.loc[[0, 2], 'predicted_labels'].tolist() == ['', '']
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('[score] 4 rows (2 empty or missing texts) in ') and 'texts/s' in last


def test_per_label_thresholds_of_the_folder_decide_the_labels(folders, tmp_path):
    """`thresholds: {label: value}` in compression_info.json wins over the single threshold."""
    import shutil
    from research_inference import INFO_FILE
    folder = str(tmp_path / 'model')
    shutil.copytree(folders['fp32'], folder)
    path = os.path.join(folder, INFO_FILE)
    info = json.load(open(path, encoding='utf-8'))
    info['thresholds'] = {name: (0.0 if name == 'spam' else 1.0) for name in LABELS}
    json.dump(info, open(path, 'w', encoding='utf-8'))
    assert score(folder, '--input', write_csv(tmp_path / 'in.csv', TEXTS[:5]), '--output', tmp_path / 'out.csv') == 0
    assert pd.read_csv(tmp_path / 'out.csv')['predicted_labels'].tolist() == ['spam'] * 5


def test_jsonl_and_text_files_and_stdin_to_stdout(folders, tmp_path, monkeypatch, capsys):
    texts = TEXTS[:6] + ['']
    expected = reference(folders['fp32'], texts)
    jsonl = tmp_path / 'in.jsonl'
    jsonl.write_text(''.join(json.dumps({'comment': t, 'n': i}, ensure_ascii=False) + '\n' for i, t in enumerate(texts)),
                     encoding='utf-8')
    assert score(folders['fp32'], '--input', jsonl, '--output', tmp_path / 'out.jsonl', '--chunk_size', 3) == 0
    rows = [json.loads(line) for line in open(tmp_path / 'out.jsonl', encoding='utf-8')]
    assert [r['n'] for r in rows] == list(range(len(texts)))
    got = np.asarray([[np.nan if r[f'prob_{n}'] is None else r[f'prob_{n}'] for n in LABELS] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    text_file = tmp_path / 'in.txt'
    text_file.write_text('\n'.join(texts) + '\n', encoding='utf-8')
    assert score(folders['fp32'], '--input', text_file, '--output', tmp_path / 'txt.csv') == 0
    out = pd.read_csv(tmp_path / 'txt.csv', keep_default_na=False, na_values={f'prob_{n}': [''] for n in LABELS})
    assert out['text'].tolist() == texts
    np.testing.assert_allclose(probability_matrix(out), expected, atol=1e-5)
    capsys.readouterr()
    piped_in = pd.DataFrame({'text': texts}).to_csv(index=False).encode('utf-8')
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(piped_in)))
    assert score(folders['fp32'], '--input', '-', '--output', '-', '--text_column', 'text') == 0
    piped = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False,
                        na_values={f'prob_{n}': [''] for n in LABELS})
    assert piped['text'].tolist() == texts
    np.testing.assert_allclose(probability_matrix(piped), expected, atol=1e-5)


def test_predict_keeps_its_old_form_and_both_commands_have_help(folders, capsys):
    from research_inference import main
    assert main([folders['fp32'], 'তুই একটা বেয়াদব']) == 0
    old = json.loads(capsys.readouterr().out)
    assert main(['predict', folders['fp32'], 'তুই একটা বেয়াদব']) == 0
    assert json.loads(capsys.readouterr().out) == old and set(old['probabilities']) == set(LABELS)
    for argv in (['--help'], ['score', '--help'], ['predict', '--help']):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert '--text_column' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one paragraph, no output file left
# ---------------------------------------------------------------------------------------------

def refused(capsys, folder, source, output, *extra):
    code = score(folder, '--input', source, '--output', output, *extra)
    lines = capsys.readouterr().err.replace('\r', '\n').splitlines()
    errors = [line for line in lines if line.startswith('error: ')]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0]   # one paragraph, the last thing said
    return errors[0]


def leftovers(folder):
    return sorted(os.listdir(folder))


def test_missing_column_lists_the_columns(folders, tmp_path, capsys):
    source = write_csv(tmp_path / 'in.csv', TEXTS[:3])
    message = refused(capsys, folders['fp32'], source, tmp_path / 'out.csv', '--text_column', 'text')
    assert "'text'" in message and 'id, comment, note' in message
    assert leftovers(tmp_path) == ['in.csv']


@pytest.mark.parametrize('content', [b'', b'comment,id\n'], ids=['no_bytes', 'header_only'])
def test_empty_file(folders, tmp_path, capsys, content):
    (tmp_path / 'in.csv').write_bytes(content)
    assert 'empty' in refused(capsys, folders['fp32'], tmp_path / 'in.csv', tmp_path / 'out.csv')
    assert leftovers(tmp_path) == ['in.csv']


@pytest.mark.parametrize('suffix', ['csv', 'txt', 'jsonl'])
def test_non_utf8_file_even_after_the_first_chunk(folders, tmp_path, capsys, suffix):
    """A CP1252 byte in the third chunk: refused after scoring has begun, and the partial output removed."""
    lines = {'csv': ['comment'] + [f'text {i}' for i in range(8)],
             'txt': [f'text {i}' for i in range(8)],
             'jsonl': [json.dumps({'comment': f'text {i}'}) for i in range(8)]}[suffix]
    data = '\n'.join(lines).encode() + '\n'.encode()
    data += {'csv': b'caf\xe9\n', 'txt': b'caf\xe9\n', 'jsonl': b'{"comment": "caf\xe9"}\n'}[suffix]
    source = tmp_path / f'in.{suffix}'
    source.write_bytes(data)
    message = refused(capsys, folders['fp32'], source, tmp_path / 'out.csv', '--chunk_size', 3)
    assert 'not UTF-8' in message
    assert leftovers(tmp_path) == [f'in.{suffix}']


def test_output_that_is_a_folder_or_the_input(folders, tmp_path, capsys):
    source = write_csv(tmp_path / 'in.csv', TEXTS[:3])
    (tmp_path / 'outdir').mkdir()
    assert 'is a folder' in refused(capsys, folders['fp32'], source, tmp_path / 'outdir')
    assert 'is the input file' in refused(capsys, folders['fp32'], source, source)
    assert 'is the input file' in refused(capsys, folders['fp32'], source, tmp_path / 'outdir' / '..' / 'in.csv')
    assert leftovers(tmp_path) == ['in.csv', 'outdir'] and not os.listdir(tmp_path / 'outdir')
    assert pd.read_csv(source)['comment'].tolist() == TEXTS[:3]


def test_a_folder_that_is_not_a_saved_model(tmp_path, capsys):
    source = write_csv(tmp_path / 'in.csv', TEXTS[:3])
    (tmp_path / 'not_a_model').mkdir()
    assert 'not a model folder' in refused(capsys, tmp_path / 'not_a_model', source, tmp_path / 'out.csv')
    assert 'not a model folder' in refused(capsys, tmp_path / 'missing', source, tmp_path / 'out.csv')
    assert leftovers(tmp_path) == ['in.csv', 'not_a_model']
