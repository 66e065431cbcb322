"""The CUDA paths, run where a GPU is present (skipped on CPU-only machines such as CI): bitsandbytes
NF4/FP4 4-bit weights, fp16/bf16 models on the GPU, and the pipeline with mixed-precision training and
an online teacher in half precision."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import fast_args, run_cli
from test_quantization import PROBE_TEXTS, build_setup, probabilities, quantize_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(scope='module')
def setup(tmp_path_factory, teacher_checkpoint):
    return build_setup(tmp_path_factory.mktemp('cuda'), teacher_checkpoint)


def quantize(setup, method, dtype):
    return quantize_case(setup, dtype, method, dtype)


def weight_file_mb(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith('.safetensors')) / 1e6


@pytest.mark.parametrize('dtype', ['nf4', 'fp4'])
def test_bitsandbytes_4bit_is_packed_smaller_and_reloads(setup, dtype):
    import bitsandbytes as bnb
    from research_inference import load_compressed_model
    model_dir, saved = quantize(setup, 'int4', dtype)
    assert saved['format'] == 'hf_bnb4' and saved['weight_dtype'] == dtype
    loaded = load_compressed_model(model_dir)
    linears4 = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears4) >= 6                                            # every encoder Linear is 4-bit
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == dtype for m in linears4)
    assert loaded.device_name.startswith('cuda')
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    others = [p for n, p in loaded.model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert others and all(p.dtype == compute for p in others)          # embeddings, norms, head: 16 bit
    assert weight_file_mb(model_dir) < 0.6 * weight_file_mb(setup['fp32_dir'])
    # Parameters are counted from the unpacked 4-bit weights: as many as the fp32 model has.
    fp32_count = sum(a.size for a in setup['fp32'].parameter_arrays().values())
    assert sum(a.size for a in loaded.parameter_arrays().values()) == fp32_count
    from research_eval import measure_peak_memory
    memory = measure_peak_memory([model_dir], 1, 32, PROBE_TEXTS[0])[model_dir]
    assert memory['peak_gpu_memory_mb'] > 0 and memory['peak_memory_mb'] > memory['peak_memory_model_mb'] > 0
    again = load_compressed_model(model_dir)
    np.testing.assert_allclose(probabilities(loaded), probabilities(again), atol=1e-6)
    np.testing.assert_allclose(probabilities(loaded), probabilities(setup['fp32']), atol=0.15)


@pytest.mark.parametrize('dtype,torch_dtype', [('fp16', torch.float16), ('bf16', torch.bfloat16)])
def test_half_precision_runs_on_the_gpu(setup, dtype, torch_dtype):
    from research_inference import load_compressed_model
    model_dir, _ = quantize(setup, 'fp16', dtype)
    gpu = load_compressed_model(model_dir, device='cuda')
    assert gpu.device_name.startswith('cuda')
    assert all(p.dtype == torch_dtype and p.is_cuda for p in gpu.model.parameters())
    np.testing.assert_allclose(probabilities(gpu), probabilities(setup['fp32']), atol=0.02 if dtype == 'fp16' else 0.05)


def test_pipeline_on_gpu_with_mixed_precision_online_teacher_and_nf4(tmp_path, teacher_checkpoint):
    """kd_prune_quant on the GPU: multi_level KD (teacher online in half precision), mixed-precision
    training, magnitude pruning, NF4 quantization; the output contract is written and the stages load."""
    from research_inference import load_compressed_model
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_prune_quant', teacher_checkpoint=teacher_checkpoint,
                             student_layers=2, kd_method='multi_level', quant_method='int4', quant_dtype='nf4',
                             cache_dir=tmp_path / 'cache', save_all_stages=True))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        stages = json.load(fh)['stages']
    assert [s['stage'] for s in stages] == ['baseline', 'kd', 'prune', 'quant']
    assert all(np.isfinite(s['f1_macro']) for s in stages)
    for stage in stages:
        assert len(load_compressed_model(stage['model_dir']).predict(PROBE_TEXTS)) == len(PROBE_TEXTS)
