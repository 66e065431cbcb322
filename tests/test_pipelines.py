"""Every pipeline end to end on tiny models: the output contract, and that each stage really did its job."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import LABELS, fast_args, run_cli

PIPELINES = ['baseline', 'kd_only', 'prune_only', 'quant_only', 'kd_prune', 'kd_quant', 'prune_quant', 'kd_prune_quant']
STAGE_KEYS = ['f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro', 'per_label',
              'size_mb', 'params_total', 'params_nonzero', 'sparsity_pruned_layers', 'sparsity_overall',
              'latency_ms_mean', 'latency_ms_p50', 'latency_ms_p95', 'latency_ms_p99', 'throughput_samples_s',
              'peak_memory_mb', 'peak_memory_model_mb', 'compression_ratio', 'speedup', 'model_dir']


def expected_stages(pipeline):
    return ['baseline'] + [s for s, key in (('kd', 'kd'), ('prune', 'prune'), ('quant', 'quant')) if key in pipeline]


@pytest.fixture(scope='module')
def pipeline_runs(tmp_path_factory, teacher_checkpoint):
    """Run all eight pipelines once (derived 2-layer student, stages kept) and return their folders."""
    cache = tmp_path_factory.mktemp('cache')
    runs = {}
    for pipeline in PIPELINES:
        out = tmp_path_factory.mktemp(pipeline)
        code = run_cli(fast_args(out, pipeline=pipeline, teacher_checkpoint=teacher_checkpoint, student_layers=2,
                                 cache_dir=cache, save_all_stages=True, measure_memory=pipeline == 'kd_prune_quant'))
        assert code == 0, pipeline
        runs[pipeline] = str(out)
    return runs


def load_results(out):
    with open(os.path.join(out, 'results_final.json'), encoding='utf-8') as fh:
        return json.load(fh)


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_output_contract(pipeline_runs, pipeline):
    out = pipeline_runs[pipeline]
    results = load_results(out)
    assert results['pipeline'] == pipeline and results['author_name'] == 'tests'
    assert [s['stage'] for s in results['stages']] == expected_stages(pipeline)
    for stage in results['stages']:
        missing = [k for k in STAGE_KEYS if k not in stage]
        assert not missing, (stage['stage'], missing)
        assert set(stage['per_label']) == set(LABELS)
        assert set(stage['per_label']['bully']) == {'precision', 'recall', 'f1', 'roc_auc', 'f1_ci_low', 'f1_ci_high'}
        assert stage['per_label']['bully']['f1_ci_low'] <= stage['per_label']['bully']['f1'] <= \
            stage['per_label']['bully']['f1_ci_high']
        assert stage['size_mb'] > 0 and stage['latency_ms_p50'] > 0
    assert results['stages'][0]['compression_ratio'] == pytest.approx(1.0)
    for stage in results['stages']:
        if pipeline == 'kd_prune_quant':   # the one run that measures it
            assert stage['peak_memory_mb'] > stage['peak_memory_model_mb'] > 0
        else:
            assert stage['peak_memory_mb'] is None and 'not measured' in stage['peak_memory_scope']
    csv = pd.read_csv(os.path.join(out, 'results_final.csv'))
    assert list(csv['stage']) == expected_stages(pipeline)
    with open(os.path.join(out, 'config.json'), encoding='utf-8') as fh:
        config = json.load(fh)
    assert config['pipeline'] == pipeline and config['pipelines'] == [pipeline] and config['teacher_checkpoint']
    with open(os.path.join(out, 'run.log'), encoding='utf-8') as fh:
        log = fh.read()
    assert 'COMPRESSION CONFIGURATION' in log and '[eval] teacher' in log and '[done]' in log


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_every_saved_stage_loads_and_predicts(pipeline_runs, pipeline):
    from research_inference import load_compressed_model
    for stage in load_results(pipeline_runs[pipeline])['stages']:
        model = load_compressed_model(stage['model_dir'])
        predictions = model.predict(['তুই একটা বেয়াদব', 'ঘরে বসে আয় করুন'])
        assert len(predictions) == 2 and set(predictions[0]) == set(LABELS)
        assert all(0.0 <= p <= 1.0 for p in predictions[0].values())


def test_student_is_smaller_than_teacher(pipeline_runs):
    baseline, kd = load_results(pipeline_runs['kd_only'])['stages']
    assert kd['params_total'] < baseline['params_total']
    assert kd['size_mb'] < baseline['size_mb']


def test_pruned_layers_reach_target_sparsity_in_saved_weights(pipeline_runs):
    stages = {s['stage']: s for s in load_results(pipeline_runs['prune_only'])['stages']}
    assert stages['baseline']['sparsity_pruned_layers'] < 0.01
    assert stages['prune']['sparsity_pruned_layers'] == pytest.approx(0.5, abs=0.005)
    # The whole model is less sparse than the pruned layers: embeddings, head and biases are not pruned.
    assert 0 < stages['prune']['sparsity_overall'] < stages['prune']['sparsity_pruned_layers']
    # Counted again independently from the safetensors file on disk.
    from safetensors.numpy import load_file
    weights = load_file(os.path.join(stages['prune']['model_dir'], 'model.safetensors'))
    ffn = weights['bert.encoder.layer.0.intermediate.dense.weight']
    assert 0.2 < (ffn == 0).mean() < 0.8
    assert np.count_nonzero(weights['classifier.weight']) == weights['classifier.weight'].size


def test_quantized_weights_are_int8_and_file_is_smaller(pipeline_runs):
    import onnx
    stages = {s['stage']: s for s in load_results(pipeline_runs['prune_quant'])['stages']}
    graph = onnx.load(os.path.join(stages['quant']['model_dir'], 'model.onnx')).graph
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) >= 4 * 6  # every encoder Linear of the 4-layer teacher is stored as int8
    assert any(node.op_type in ('MatMulInteger', 'DynamicQuantizeMatMul') for node in graph.node)
    assert stages['quant']['size_mb'] < stages['prune']['size_mb'] / 2
    # Pruned zeros survive quantization (symmetric int8, zero point 0).
    assert stages['quant']['sparsity_pruned_layers'] >= stages['prune']['sparsity_pruned_layers'] - 1e-6


def test_all_pipelines_scored_on_the_same_split(pipeline_runs):
    hashes = {load_results(out)['test_split_hash'] for out in pipeline_runs.values()}
    assert len(hashes) == 1
    baselines = {round(load_results(out)['stages'][0]['f1_macro'], 6) for out in pipeline_runs.values()}
    assert len(baselines) == 1  # the same teacher on the same split gives the same metrics


def test_student_with_its_own_tokenizer(tmp_path, teacher_checkpoint, tiny_student_dir):
    """A student from --student_path with a different tokenizer and width trains against the teacher."""
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_only', teacher_checkpoint=teacher_checkpoint,
                             student_path=tiny_student_dir, cache_dir=tmp_path / 'cache'))
    assert code == 0
    baseline, kd = load_results(str(tmp_path / 'out'))['stages']
    assert kd['params_total'] < baseline['params_total']


def test_teacher_is_fine_tuned_when_no_checkpoint(teacher_checkpoint):
    from research_inference import load_compressed_model
    model = load_compressed_model(teacher_checkpoint)
    assert model.info['stage'] == 'baseline'
    with open(os.path.join(os.path.dirname(os.path.dirname(teacher_checkpoint)), 'results_final.json')) as fh:
        f1 = json.load(fh)['stages'][0]['f1_macro']
    assert f1 > 0.0


def test_peak_memory_grows_with_the_weights_a_model_touches(tmp_path, tiny_teacher_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from research_eval import measure_peak_memory
    from research_inference import save_hf
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    info = {'label_names': LABELS, 'max_length': 32, 'threshold': 0.5}
    ballast = np.ones(2 ** 30 // 8)   # 1 GB resident in this process: the child must not count it
    measured = {}
    for name, ffn in (('small', 37), ('large', 60000)):   # 60000-wide FFN: 2 x 4 layers x 96 x 60000 x 4 B = 184 MB
        config = AutoConfig.from_pretrained(tiny_teacher_dir, num_labels=len(LABELS), intermediate_size=ffn)
        save_hf(str(tmp_path / name), AutoModelForSequenceClassification.from_config(config), tokenizer, info)
        measured[name] = measure_peak_memory([str(tmp_path / name)], 1, 32, 'তুই একটা বেয়াদব')[str(tmp_path / name)]
    del ballast
    assert 900 > measured['small']['peak_memory_mb'] > measured['small']['peak_memory_model_mb'] > 0
    assert measured['large']['peak_memory_model_mb'] - measured['small']['peak_memory_model_mb'] > 60


def test_latency_is_measured_side_by_side_with_its_spread_and_runtime_split(pipeline_runs):
    """Every stage carries the interleaved measurement (speed-up median and IQR, thread count, rounds); an
    ONNX stage also separates the runtime's gain from the quantization's, and the parts multiply to the whole."""
    stages = load_results(pipeline_runs['kd_prune_quant'])['stages']
    for stage in stages:
        assert stage['latency_threads'] == 1 and stage['latency_rounds'] >= 5 * len(stages)
        assert stage['speedup'] > 0 and stage['speedup_iqr'] >= 0 and isinstance(stage['latency_noisy'], bool)
    baseline, _, pruned, quant = stages
    assert baseline['speedup'] == 1.0 and baseline['speedup_iqr'] == 0.0
    assert quant['speedup_includes_runtime_change'] is True and 'speedup_includes_runtime_change' not in pruned
    composed = pruned['speedup'] * quant['runtime_speedup_onnx_vs_pytorch'] * quant['speedup_vs_fp32_onnx']
    assert composed == pytest.approx(quant['speedup'], rel=0.35)


def test_compressed_size_shows_what_sparsity_buys_in_storage(pipeline_runs):
    baseline, pruned = load_results(pipeline_runs['prune_only'])['stages']
    assert baseline['size_mb_compressed'] > 0.85 * baseline['size_mb']        # dense weights barely compress
    assert pruned['size_mb'] == pytest.approx(baseline['size_mb'], rel=0.01)   # zeros are still stored...
    assert pruned['size_mb_compressed'] < 0.8 * baseline['size_mb_compressed']  # ...but they zip away
    assert pruned['compression_ratio_compressed'] > 1.2
