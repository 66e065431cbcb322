"""The example notebook (notebooks/kaggle_colab_quickstart.ipynb) runs offline from top to bottom, as a
Kaggle/Colab user would run it, with its hub cells skipped; the test passes its smallest settings."""

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'kaggle_colab_quickstart.ipynb')
# Appended to the notebook's run (later arguments win): the smallest settings that still train every stage.
TINY = ('--student_layers 2 --teacher_epochs 1 --epochs 1 --fine_tune_epochs 1 --max_length 32 --data_fraction 0.5 '
        '--latency_runs 5 --latency_budget_s 0 --no_peak_memory')


def execute(path):
    """Run the notebook from notebooks/, as Jupyter does when it is opened there; the outputs of every code cell."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name='python3', resources={'metadata': {'path': path}}).execute()
    outputs = {i: cell.get('outputs', []) for i, cell in enumerate(notebook.cells) if cell.cell_type == 'code'}
    errors = [o for cell in outputs.values() for o in cell if o.output_type == 'error']
    assert not errors, errors
    text = '\n'.join(o.get('text', '') + o.get('data', {}).get('text/plain', '') for cell in outputs.values() for o in cell)
    return outputs, text


@pytest.mark.slow
def test_notebook_runs_offline_top_to_bottom_twice_on_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('NOTEBOOK_OUTPUT_DIR', str(tmp_path / 'out'))
    monkeypatch.setenv('NOTEBOOK_EXTRA_ARGS', TINY)
    started = time.time()
    outputs, text = execute(os.path.dirname(NOTEBOOK))
    print(f'notebook ran in {time.time() - started:.0f} s')
    assert '[done] kd_prune_quant' in text                           # the pipeline ran
    assert 'kd_logit' in text and 'quant' in text                     # KD terms read back, results table shown
    assert 'KD logs from logs' in text
    assert any('image/png' in o.get('data', {}) for cell in outputs.values() for o in cell)   # the plot
    assert 'skipped: needs ONLINE = True' in text                     # the hub cells stayed offline
    assert (tmp_path / 'out' / 'quickstart' / 'stages' / 'quant' / 'model.onnx').is_file()
    # A user re-runs it on the same folder: every stage comes from the store (no new TensorBoard logs), the
    # earlier run is archived, and the KD terms are read from the archived run's logs.
    _, again = execute(os.path.dirname(NOTEBOOK))
    assert '(0 stage(s) run' in again, again[-3000:]
    assert 'KD logs from previous_runs' in again and 'kd_logit' in again
    assert (tmp_path / 'out' / 'quickstart' / 'stages' / 'quant' / 'model.onnx').is_file()
