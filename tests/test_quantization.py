"""Quantization methods on the tiny fine-tuned teacher, pruned to 50% first so that every method is also
checked for keeping pruned weights at exactly zero.

For each CPU method: the quantized layers have the expected storage type, the saved artifact is smaller
than the fp32 one, reloading gives the same predictions, macro-F1 stays within a stated tolerance of
the fp32 model, and pruned zeros stay zero. nf4/fp4 (bitsandbytes) need CUDA and must exit 2 here.
"""

import contextlib
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import fast_args, run_cli

# The quantized model's test macro-F1 may be at most this much below the fp32 (pruned) model's.
F1_TOLERANCE = {'dynamic': 0.05, 'static': 0.05, 'qat': 0.05, 'fp16': 0.03, 'bf16': 0.03, 'int4': 0.10}
CASES = {  # case -> (--quant_method, --quant_dtype)
    'dynamic': ('dynamic', None), 'static': ('static', None), 'qat': ('qat', None),
    'fp16': ('fp16', 'fp16'), 'bf16': ('fp16', 'bf16'), 'int4': ('int4', 'int4'),
}
ENCODER_LINEARS = 4 * 6  # the tiny teacher: 4 layers x (query, key, value, attention output, intermediate, output)
PROBE_TEXTS = ['তুই একটা বেয়াদব', 'ঘরে বসে আয় করুন', 'আজকের খেলা দারুণ হয়েছে', 'ধর্ম নিয়ে কটূক্তি করিস না']


@contextlib.contextmanager
def one_torch_thread():
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine PyTorch's two
    threads spin against other jobs: QAT of the tiny model took 122 s with 2 threads, 2 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prune_encoder_linears(model, sparsity=0.5):
    """Zero the smallest-magnitude half of every encoder Linear weight (stand-in for the pruning stage)."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and '.encoder.' in f'.{name}.':
                weight = module.weight
                cutoff = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight[weight.abs() <= cutoff] = 0.0
                names.append(name + '.weight')
    return names


def build_setup(root, teacher_checkpoint, prune=False, **overrides):
    """The tiny fine-tuned teacher (its encoder pruned to 50% when `prune`), its data and fp32 copy on disk."""
    from research_compression_config import parse_compression_arguments
    from research_data import positive_class_weights, prepare_data, tokenized_splits
    from research_inference import TorchClassifier, save_hf
    from research_models import load_fine_tuned_classifier
    args = parse_compression_arguments(fast_args(root / 'out', pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                                                 cache_dir=root / 'cache', **overrides))
    data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, args.eval_fold,
                        args.data_fraction, args.val_fraction, args.seed)
    model, tokenizer = load_fine_tuned_classifier(teacher_checkpoint, args.label_columns)
    pruned_names = prune_encoder_linears(model) if prune else []
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    info = {'label_names': list(args.label_columns), 'max_length': args.max_length, 'threshold': args.threshold}
    fp32_dir = str(root / 'fp32')
    save_hf(fp32_dir, model, tokenizer, info)
    return {'root': root, 'args': args, 'model': model, 'tokenizer': tokenizer, 'splits': splits, 'info': info,
            'pos_weight': positive_class_weights(data.labels[data.train_idx]), 'pruned_names': pruned_names,
            'fp32_dir': fp32_dir, 'fp32': TorchClassifier(model, tokenizer, args.label_columns, args.max_length,
                                                          args.threshold, info)}


@pytest.fixture(scope='module')
def setup(tmp_path_factory, teacher_checkpoint):
    return build_setup(tmp_path_factory.mktemp('quant'), teacher_checkpoint, prune=True, quant_calibration_batches=8,
                       fine_tune_lr=2e-5)


@pytest.fixture(scope='module')
def quantized(setup):
    """Every CPU case quantized once and saved: case -> (folder, info returned by the quantizer)."""
    with one_torch_thread():
        return quantize_every_case(setup)


def quantize_case(setup, name, method, dtype):
    """Quantize the setup's model with one method into <root>/<name>: (folder, info returned by the quantizer)."""
    from research_quantization import quantize_and_save, resolve_quant_dtype
    args = setup['args'].replace(quant_method=method, quant_dtype=dtype,
                                 quant_dtype_resolved=resolve_quant_dtype(method, dtype))
    model_dir = str(setup['root'] / name)
    saved = quantize_and_save(setup['model'], setup['tokenizer'], model_dir, args, setup['splits'].train,
                              setup['splits'].val, setup['pos_weight'], setup['info'])
    return model_dir, saved


def quantize_every_case(setup):
    return {case: quantize_case(setup, case, method, dtype) for case, (method, dtype) in CASES.items()}


def macro_f1(classifier, dataset, threshold=0.5):
    from research_eval import predict_probabilities, quality_metrics
    labels, probs = predict_probabilities(classifier, dataset)
    return quality_metrics(labels, probs, classifier.label_names, threshold)['f1_macro']


def probabilities(classifier):
    return np.array([[row[k] for k in classifier.label_names] for row in classifier.predict(PROBE_TEXTS)])


def onnx_graph(model_dir):
    import onnx
    return onnx.load(os.path.join(model_dir, 'model.onnx')).graph


def initializer_names_by_type(graph, data_type):
    import onnx
    return {i.name for i in graph.initializer if i.data_type == data_type}


def static_int8_checks(graph, setup, info):
    """Encoder Linear weights stored as int8 with zero point 0, activations quantized with a stored
    (static) uint8 scale: QuantizeLinear nodes, and no run-time DynamicQuantizeLinear."""
    import onnx
    from onnx import numpy_helper
    int8 = initializer_names_by_type(graph, onnx.TensorProto.INT8)
    by_torch_name = {info['onnx_weight_names'].get(n[:-len('_quantized')]) for n in int8 if n.endswith('_quantized')}
    assert set(setup['pruned_names']) <= by_torch_name
    zero_points = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith('_zero_point')}
    weight_zps = [zero_points[n[:-len('_quantized')] + '_zero_point'] for n in int8 if n.endswith('_quantized')]
    assert all(np.all(zp == 0) for zp in weight_zps)
    activation_q = [n for n in graph.node if n.op_type == 'QuantizeLinear']
    assert len(activation_q) >= 4 * 4  # per layer: the q/k/v input, attention output, intermediate, output inputs
    assert all(zero_points[n.input[2]].dtype == np.uint8 for n in activation_q)
    assert not any(n.op_type in ('DynamicQuantizeLinear', 'DynamicQuantizeMatMul') for n in graph.node)


def test_dynamic_stores_int8_weights(setup, quantized):
    import onnx
    graph = onnx_graph(quantized['dynamic'][0])
    assert len([i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]) >= ENCODER_LINEARS
    assert any(n.op_type in ('MatMulInteger', 'DynamicQuantizeMatMul', 'DynamicQuantizeLinear') for n in graph.node)


def test_static_stores_int8_weights_and_calibrated_uint8_activations(setup, quantized):
    model_dir, info = quantized['static']
    static_int8_checks(onnx_graph(model_dir), setup, info)
    assert info['calibration_batches'] == min(8, -(-len(setup['splits'].train) // setup['args'].batch))


def test_qat_converts_to_int8_with_the_learned_ranges(setup, quantized):
    """The real int8 graph uses the activation scales learned during fake-quant training, not a fresh
    calibration: every learned (scale, zero point) is the one stored on its QuantizeLinear node."""
    from onnx import numpy_helper
    model_dir, info = quantized['qat']
    graph = onnx_graph(model_dir)
    static_int8_checks(graph, setup, info)
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    by_input = {n.input[0]: (stored[n.input[1]], stored[n.input[2]]) for n in graph.node if n.op_type == 'QuantizeLinear'}
    learned = info['qat_activation_qparams']
    assert len(learned) >= 4 * 4
    for tensor, (scale, zero_point) in learned.items():
        assert by_input[tensor][0] == pytest.approx(scale, rel=1e-6) and int(by_input[tensor][1]) == zero_point
    static_graph = onnx_graph(quantized['static'][0])
    static_scales = {n.input[0]: float(numpy_helper.to_array(next(i for i in static_graph.initializer if i.name == n.input[1])))
                     for n in static_graph.node if n.op_type == 'QuantizeLinear'}
    assert any(abs(static_scales.get(t, 0) - s) > 1e-6 * s for t, (s, _) in learned.items())


@pytest.mark.parametrize('case,dtype', [('fp16', 'F16'), ('bf16', 'BF16')])
def test_half_precision_stores_half_weights(quantized, case, dtype):
    import json
    import struct
    path = os.path.join(quantized[case][0], 'model.safetensors')
    with open(path, 'rb') as fh:
        header = json.loads(fh.read(struct.unpack('<Q', fh.read(8))[0]))
    dtypes = {v['dtype'] for k, v in header.items() if k != '__metadata__' and 'position_ids' not in k}
    assert dtypes == {dtype}


def test_int4_is_really_4bit(setup, quantized):
    """Every encoder Linear runs as a 4-bit MatMulNBits whose stored weight is K*N/2 bytes, and no float
    copy of those weights is left in the file; the embedding tables are 4-bit as well."""
    import onnx
    graph = onnx_graph(quantized['int4'][0])
    nbits = [n for n in graph.node if n.op_type == 'MatMulNBits']
    assert len(nbits) >= ENCODER_LINEARS
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs['bits'] == 4
        assert sizes[node.input[1]] == attrs['N'] * (-(-attrs['K'] // attrs['block_size'])) * attrs['block_size'] // 2
    float_weights = {quantized['int4'][1]['onnx_weight_names'].get(i.name) for i in graph.initializer
                     if i.data_type == onnx.TensorProto.FLOAT}
    assert not float_weights & set(setup['pruned_names'])
    assert any(n.op_type == 'GatherBlockQuantized' for n in graph.node)


@pytest.mark.parametrize('case', list(CASES))
def test_saved_artifact_is_smaller_than_fp32(setup, quantized, case):
    from research_eval import size_on_disk_mb
    fp32_mb = size_on_disk_mb(setup['fp32_dir'])
    # int8 is a quarter of fp32 plus the QDQ graph and scales, a larger share in this tiny model (MiniLM: 0.26).
    limit = {'fp16': 0.52, 'bf16': 0.52, 'int4': 0.25}.get(case, 0.40)
    assert size_on_disk_mb(quantized[case][0]) < limit * fp32_mb


@pytest.mark.parametrize('case', list(CASES))
def test_reload_predicts_the_same(setup, quantized, case, tmp_path):
    """Loading the folder (also after moving it) gives exactly the predictions of the quantized model:
    for ONNX, an onnxruntime session opened directly on the written file; for fp16/bf16, the in-memory
    half-precision model."""
    from research_inference import OnnxClassifier, TorchClassifier, load_compressed_model
    model_dir, info = quantized[case]
    loaded = probabilities(load_compressed_model(model_dir))
    moved = str(tmp_path / 'moved')
    shutil.copytree(model_dir, moved)
    assert np.array_equal(probabilities(load_compressed_model(moved)), loaded)
    s = setup
    if info['format'] == 'onnx':
        reference = OnnxClassifier(os.path.join(model_dir, 'model.onnx'), s['tokenizer'], s['info']['label_names'],
                                   s['info']['max_length'], 0.5, info)
    else:
        half = s['model'].__class__.from_pretrained(s['fp32_dir']).to({'fp16': torch.float16, 'bf16': torch.bfloat16}[case])
        reference = TorchClassifier(half, s['tokenizer'], s['info']['label_names'], s['info']['max_length'], 0.5, info)
    assert np.array_equal(probabilities(reference), loaded)


@pytest.mark.parametrize('case', list(CASES))
def test_macro_f1_within_tolerance_of_fp32(setup, quantized, case):
    from research_inference import load_compressed_model
    test = setup['splits'].test
    fp32 = macro_f1(setup['fp32'], test)
    assert fp32 > 0.2  # the tiny teacher learned something, so the comparison means something
    assert macro_f1(load_compressed_model(quantized[case][0]), test) >= fp32 - F1_TOLERANCE[case]


@pytest.mark.parametrize('case', list(CASES))
def test_pruned_weights_stay_zero(setup, quantized, case):
    """Every weight that was pruned to 0 is stored as 0 (symmetric quantization: no zero-point offset)."""
    from research_inference import load_compressed_model
    arrays = load_compressed_model(quantized[case][0]).parameter_arrays()
    original = dict(setup['model'].state_dict())
    for name in setup['pruned_names']:
        stored = arrays[name]
        zeros = (original[name] == 0).numpy()
        if quantized[case][1]['format'] == 'onnx' and case != 'int4':  # MatMul stores W transposed
            stored = stored.T
        assert np.all(stored[zeros] == 0), name
        assert zeros.mean() == pytest.approx(0.5, abs=0.01)


def test_fake_quant_linear_trains_through_rounding():
    """QAT building block: in training it tracks the input range, its output is the Linear of the
    quantize-dequantized input and weight, and gradients reach the weight (straight-through)."""
    from research_quantization import FakeQuantLinear, uint8_affine_qparams
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[0, :4] = 0.0
    layer = FakeQuantLinear(linear).train()
    x = torch.randn(16, 8) * 3
    out = layer(x)
    assert float(layer.input_min) == pytest.approx(float(x.min())) and float(layer.input_max) == pytest.approx(float(x.max()))
    scale, zero_point = uint8_affine_qparams(layer.input_min, layer.input_max)
    x_grid = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    w_scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    w_grid = torch.round(linear.weight / w_scale) * w_scale
    assert torch.allclose(out, torch.nn.functional.linear(x_grid, w_grid, linear.bias), atol=1e-5)
    assert not torch.allclose(out, linear(x), atol=1e-4)  # rounding really happens
    out.sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert torch.all(linear.weight.grad[0, :4] == 0)  # pruned weights get no update
    layer(x * 10)
    assert float(layer.input_max) < float((x * 10).max())  # moving average, not the last batch


def test_nf4_without_cuda_exits_2_naming_the_requirement(tmp_path, teacher_checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    for dtype in ('nf4', 'fp4'):
        code = run_cli(fast_args(tmp_path / dtype, pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                                 quant_method='int4', quant_dtype=dtype, cache_dir=tmp_path / 'cache'))
        assert code == 2
        err = capsys.readouterr().err
        assert 'CUDA' in err and 'bitsandbytes' in err and '--quant_dtype int4' in err
        assert not os.path.exists(tmp_path / dtype / 'stages' / 'quant')


def test_quant_dtype_that_does_not_fit_the_method_exits_2(tmp_path, capsys):
    code = run_cli(fast_args(tmp_path / 'out', pipeline='quant_only', quant_method='fp16', quant_dtype='int4'))
    assert code == 2
    assert '--quant_dtype int4 does not fit --quant_method fp16' in capsys.readouterr().err


def test_qat_through_the_cli(tmp_path, teacher_checkpoint):
    """The pipeline passes the validation split and pos_weight to QAT and evaluates the int8 artifact."""
    import json
    with one_torch_thread():
        code = run_cli(fast_args(tmp_path / 'out', pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                                 quant_method='qat', cache_dir=tmp_path / 'cache'))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, quant = json.load(fh)['stages']
    assert quant['size_mb'] < baseline['size_mb'] / 2
    with open(tmp_path / 'out' / 'stages' / 'quant' / 'compression_info.json', encoding='utf-8') as fh:
        assert json.load(fh)['quant_method'] == 'qat'


def test_device_option_moves_torch_models_and_refuses_what_cannot_move(setup, quantized):
    from research_errors import UsageError
    from research_inference import load_compressed_model
    half = load_compressed_model(quantized['bf16'][0], device='cpu')
    assert half.device_name == 'cpu' and next(half.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UsageError, match='runs on the CPU with ONNX Runtime'):
        load_compressed_model(quantized['dynamic'][0], device='cuda')
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match='no CUDA GPU'):
            load_compressed_model(setup['fp32_dir'], device='cuda')
