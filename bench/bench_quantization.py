"""Benchmark every quantization method against fp32 in one run, on the real data.

    flock /tmp/bench.lock python bench/bench_quantization.py ../shared/data/bangla_cyberbullying_5label.csv \
        --teacher_checkpoint /work/bench_runs/teacher/stages/baseline

For each method: test macro-F1 (and its difference to torch fp32), size on disk of the saved artifact,
and CPU latency at batch 1 and batch 32 (texts padded to --max_length) with ratios to torch fp32. The
rows include ONNX Runtime fp32 (the export without quantization) so the runtime's own speed-up is not
credited to quantization. Latency is timed in interleaved rounds (every model once per round), so load
from other processes on a shared machine hits all rows alike; the median over rounds is reported.

The split must be the one the teacher was trained with (same --data_fraction, --num_folds, --eval_fold,
--seed as its run), so that the test rows were never seen in training; the defaults match
/work/bench_runs/teacher (fraction 0.4, 5 folds, fold 0, seed 42, max_length 64).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from research_compression_config import parse_compression_arguments  # noqa: E402
from research_data import positive_class_weights, prepare_data, tokenized_splits  # noqa: E402
from research_eval import latency_batch, predict_probabilities, quality_metrics, size_on_disk_mb  # noqa: E402
from research_errors import UsageError  # noqa: E402
from research_inference import OnnxClassifier, load_compressed_model, save_hf  # noqa: E402
from research_models import load_fine_tuned_classifier  # noqa: E402
from research_quantization import export_to_onnx, quantize_and_save, resolve_quant_dtype  # noqa: E402

# row name -> (--quant_method, --quant_dtype); fp32 rows are built separately.
QUANT_ROWS = {
    'ORT dynamic int8': ('dynamic', None),
    'ORT static int8': ('static', None),
    'QAT -> ORT int8': ('qat', None),
    'torch fp16': ('fp16', 'fp16'),
    'torch bf16': ('fp16', 'bf16'),
    'ORT int4 (MatMulNBits)': ('int4', 'int4'),
    'bnb nf4 (CUDA)': ('int4', 'nf4'),
    'bnb fp4 (CUDA)': ('int4', 'fp4'),
}
CPU_ROWS = [name for name in QUANT_ROWS if name != 'bnb fp4 (CUDA)']
# On a GPU (--device cuda) only the PyTorch models move there; ONNX Runtime rows stay CPU-only.
CUDA_ROWS = ['torch fp16', 'torch bf16', 'bnb nf4 (CUDA)', 'bnb fp4 (CUDA)']


def parse_bench_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('dataset_path')
    parser.add_argument('--teacher_checkpoint', required=True, help='Fine-tuned classifier folder (stages/baseline).')
    parser.add_argument('--data_fraction', type=float, default=0.4)
    parser.add_argument('--num_folds', type=int, default=5)
    parser.add_argument('--eval_fold', type=int, default=0)
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--max_length', type=int, default=64)
    parser.add_argument('--batch', type=int, default=32, help='Calibration / QAT batch size.')
    parser.add_argument('--calibration_batches', type=int, default=32, help='--quant_calibration_batches of static.')
    parser.add_argument('--qat_train_fraction', type=float, default=0.25, help='Part of the training split QAT fine-tunes on.')
    parser.add_argument('--qat_epochs', type=int, default=1)
    parser.add_argument('--qat_lr', type=float, default=2e-5)
    parser.add_argument('--rounds_b1', type=int, default=30, help='Timed rounds at batch 1 (after 3 warm-up calls).')
    parser.add_argument('--rounds_b32', type=int, default=6, help='Timed rounds at batch 32 (after 1 warm-up call).')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='Where the PyTorch models run. cuda: fp32, fp16, bf16, NF4 and FP4 on the GPU '
                             '(ONNX Runtime rows are CPU-only and left out).')
    parser.add_argument('--rows', type=str, default=None,
                        help=f'Comma-separated quantized rows to run (default on cpu: {",".join(CPU_ROWS)}; '
                             f'on cuda: {",".join(CUDA_ROWS)}).')
    parser.add_argument('--work_dir', type=str, default=None, help='Where the artifacts go (default: a temporary folder).')
    parser.add_argument('--json_out', type=str, default=None, help='Also write the rows as JSON here.')
    return parser.parse_args()


def research_args(bench, work_dir):
    """The tool's own arguments for these settings, so the methods run exactly as from the CLI."""
    argv = ['--dataset_path', bench.dataset_path, '--author_name', 'bench', '--output_dir', work_dir,
            '--teacher_checkpoint', bench.teacher_checkpoint, '--data_fraction', str(bench.data_fraction),
            '--num_folds', str(bench.num_folds), '--eval_fold', str(bench.eval_fold), '--seed', str(bench.seed),
            '--max_length', str(bench.max_length), '--batch', str(bench.batch),
            '--quant_calibration_batches', str(bench.calibration_batches), '--fine_tune_epochs', str(bench.qat_epochs),
            '--fine_tune_lr', str(bench.qat_lr), '--cache_dir', os.path.join(work_dir, 'cache'), '--no_progress_bars']
    return parse_compression_arguments(argv)


def quality(classifier, dataset, threshold):
    labels, probs = predict_probabilities(classifier, dataset)
    return quality_metrics(labels, probs, classifier.label_names, threshold)['f1_macro']


def time_interleaved(classifiers, batch, rounds, warmup):
    """Median ms per call of every classifier on `batch`, timed round-robin (one call each per round)."""
    for classifier in classifiers.values():
        for _ in range(warmup):
            classifier.logits(batch)
    times = {name: [] for name in classifiers}
    for _ in range(rounds):
        for name, classifier in classifiers.items():
            start = time.perf_counter()
            classifier.logits(batch)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(t)) for name, t in times.items()}


def build_rows(bench, args, model, tokenizer, splits, pos_weight, work_dir):
    """Save every variant to its own folder and load it back; returns name -> (classifier, folder, seconds)."""
    info = {'label_names': list(args.label_columns), 'max_length': args.max_length, 'threshold': args.threshold}
    rows = {}
    fp32_dir = os.path.join(work_dir, 'torch_fp32')
    save_hf(fp32_dir, model, tokenizer, info)
    rows['torch fp32'] = (load_compressed_model(fp32_dir, device=bench.device), fp32_dir, 0.0, '')
    if bench.device == 'cpu':
        ort_dir = os.path.join(work_dir, 'ort_fp32')
        os.makedirs(ort_dir, exist_ok=True)
        export_to_onnx(model, tokenizer, os.path.join(ort_dir, 'model.onnx'), args.max_length)
        rows['ORT fp32'] = (OnnxClassifier(os.path.join(ort_dir, 'model.onnx'), tokenizer, args.label_columns,
                                           args.max_length, args.threshold, info), ort_dir, 0.0, '')
    qat_train = splits.train.select(range(int(len(splits.train) * bench.qat_train_fraction)))
    for name in [r for r in bench.rows.split(',') if r]:
        method, dtype = QUANT_ROWS[name]
        row_args = args.replace(quant_method=method, quant_dtype=dtype,
                                quant_dtype_resolved=resolve_quant_dtype(method, dtype))
        model_dir = os.path.join(work_dir, name.replace(' ', '_').replace('(', '').replace(')', '').replace('>', ''))
        train = qat_train if method == 'qat' else splits.train
        started = time.time()
        try:
            saved = quantize_and_save(model, tokenizer, model_dir, row_args, train, splits.val, pos_weight, info)
        except UsageError as exc:
            print(f'[bench] {name}: not run here: {exc}')
            rows[name] = (None, None, 0.0, f'not run: {type(exc).__name__} (needs a CUDA GPU; none on this machine)')
            continue
        seconds = time.time() - started
        print(f'[bench] {name}: quantized in {seconds:.0f} s')
        device = bench.device if saved.get('format') == 'hf' else None   # ONNX stays on CPU, bnb loads on the GPU
        rows[name] = (load_compressed_model(model_dir, device=device), model_dir, seconds, '')
    return rows


def format_table(results, settings):
    head = ('| variant | macro-F1 | ΔF1 vs fp32 | size MB | size vs fp32 | b1 ms | b1 speed-up | b32 ms | b32 speed-up | '
            'quantize s |')
    lines = [head, '|' + '---|' * 10]
    base = results['torch fp32']
    for name, r in results.items():
        if r.get('note'):
            lines.append(f'| {name} | {r["note"]} | | | | | | | | |')
            continue
        lines.append(f'| {name} | {r["f1_macro"]:.4f} | {r["f1_macro"] - base["f1_macro"]:+.4f} | {r["size_mb"]:.1f} | '
                     f'{r["size_mb"] / base["size_mb"]:.2f}x | {r["b1_ms"]:.1f} | {base["b1_ms"] / r["b1_ms"]:.2f}x | '
                     f'{r["b32_ms"]:.0f} | {base["b32_ms"] / r["b32_ms"]:.2f}x | {r["quantize_s"]:.0f} |')
    return '\n'.join([settings, '', *lines])


def main():
    bench = parse_bench_arguments()
    if bench.rows is None:
        bench.rows = ','.join(CUDA_ROWS if bench.device == 'cuda' else CPU_ROWS)
    torch.manual_seed(bench.seed)
    work_dir = bench.work_dir or tempfile.mkdtemp(prefix='bench_quant_')
    os.makedirs(work_dir, exist_ok=True)
    args = research_args(bench, os.path.join(work_dir, 'unused_output'))
    data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, args.eval_fold,
                        args.data_fraction, args.val_fraction, args.seed)
    model, tokenizer = load_fine_tuned_classifier(args.teacher_checkpoint, args.label_columns)
    model = model.float()  # a checkpoint stored in 16 bit (to travel light) is the fp32 reference once widened
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    pos_weight = positive_class_weights(data.labels[data.train_idx])
    rows = build_rows(bench, args, model, tokenizer, splits, pos_weight, work_dir)

    runnable = {name: row[0] for name, row in rows.items() if row[0] is not None}
    batch1 = latency_batch(splits.test, tokenizer, 1, args.max_length)
    batch32 = latency_batch(splits.test, tokenizer, 32, args.max_length)
    b1 = time_interleaved(runnable, batch1, bench.rounds_b1, warmup=3)
    b32 = time_interleaved(runnable, batch32, bench.rounds_b32, warmup=1)
    results = {}
    for name, (classifier, folder, seconds, note) in rows.items():
        if classifier is None:
            results[name] = {'note': note}
            continue
        results[name] = {'f1_macro': quality(classifier, splits.test, args.threshold), 'size_mb': size_on_disk_mb(folder),
                         'b1_ms': b1[name], 'b32_ms': b32[name], 'quantize_s': seconds}
    where = (f'GPU {torch.cuda.get_device_name()} (torch {torch.__version__})' if bench.device == 'cuda' else
             f'{platform.machine()} CPU with {os.cpu_count()} cores (torch {torch.get_num_threads()} threads), '
             f'no GPU={not torch.cuda.is_available()}')
    settings = (f'{time.strftime("%Y-%m-%d")}, {where}; teacher '
                f'{bench.teacher_checkpoint}; data {os.path.basename(bench.dataset_path)} fraction {bench.data_fraction}, '
                f'fold {bench.eval_fold} of {bench.num_folds} as test ({len(splits.test)} texts), seq {args.max_length}; '
                f'static: {bench.calibration_batches} calibration batches of {bench.batch}; QAT: {bench.qat_epochs} '
                f'epoch on {len(splits.train.select(range(int(len(splits.train) * bench.qat_train_fraction))))} training '
                f'texts at lr {bench.qat_lr:g}; latency: median of {bench.rounds_b1} (batch 1) / {bench.rounds_b32} '
                f'(batch 32) interleaved rounds.')
    print('\n' + format_table(results, settings))
    if bench.json_out:
        with open(bench.json_out, 'w', encoding='utf-8') as fh:
            json.dump({'settings': settings, 'rows': results}, fh, indent=2)
    if not bench.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == '__main__':
    main()
