"""Evaluation: quality metrics (multi-label), efficiency metrics measured on the saved artifact, the
evaluation of a stored stage, and the comparison of every stage against the baseline. One place computes
each metric; the results JSON/CSV, the ablation table and the model card all read these dictionaries.
"""

import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support,
                             roc_auc_score)

from research_data import batches_of, tokenized_splits
from research_inference import TorchClassifier, load_compressed_model, sigmoid
from research_models import weight_names_in_group
from research_vocab import unknown_token_share

# Files that hold model weights; tokenizer files, configs and cards are not counted in size_mb.
WEIGHT_FILE_SUFFIXES = ('.safetensors', '.onnx', '.onnx_data', '.bin', '.pt', '.gguf')


def quality_metrics(y_true: np.ndarray, probs: np.ndarray, label_names: Sequence[str], threshold: float = 0.5) -> Dict:
    """F1 macro/micro/weighted, exact match, Hamming loss, ROC-AUC (macro over labels where both classes
    occur) and per-label precision/recall/F1/ROC-AUC, at a fixed decision threshold."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(probs) >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    aucs = []
    for j in range(y_true.shape[1]):
        both_classes = 0 < y_true[:, j].sum() < len(y_true)
        aucs.append(float(roc_auc_score(y_true[:, j], probs[:, j])) if both_classes else None)
    defined = [a for a in aucs if a is not None]
    return {
        'f1_macro': float(f1_score(y_true, y_pred, average='macro', zero_division=0)),
        'f1_micro': float(f1_score(y_true, y_pred, average='micro', zero_division=0)),
        'f1_weighted': float(f1_score(y_true, y_pred, average='weighted', zero_division=0)),
        'exact_match': float(accuracy_score(y_true, y_pred)),
        'hamming_loss': float(hamming_loss(y_true, y_pred)),
        'roc_auc_macro': float(np.mean(defined)) if defined else None,
        'per_label': {name: {'precision': float(precision[j]), 'recall': float(recall[j]), 'f1': float(f1[j]),
                             'roc_auc': aucs[j]} for j, name in enumerate(label_names)},
    }


def predict_probabilities(classifier, dataset, batch_size: int = 64):
    """(labels, probabilities) of a classifier from `research_inference` on a tokenized split."""
    labels, probs = [], []
    for batch in batches_of(dataset, classifier.tokenizer, batch_size):
        labels.append(batch.pop('labels').numpy())
        probs.append(sigmoid(classifier.logits(batch)))
    return np.concatenate(labels), np.concatenate(probs)


def macro_f1_of_model(model, tokenizer, dataset, label_names: Sequence[str], max_length: int, threshold: float) -> float:
    """Macro-F1 of an in-memory PyTorch model on a tokenized split (the same metric code as a stage's)."""
    classifier = TorchClassifier(model, tokenizer, label_names, max_length, threshold, {})
    labels, probs = predict_probabilities(classifier, dataset)
    return quality_metrics(labels, probs, label_names, threshold)['f1_macro']


def size_on_disk_mb(model_dir: str) -> float:
    """Megabytes (10^6 bytes) of the weight files actually written in `model_dir`."""
    total = 0
    for root, _, files in os.walk(model_dir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(WEIGHT_FILE_SUFFIXES))
    return total / 1e6


def latency_batch(dataset, tokenizer, batch_size: int, seq_len: int) -> dict:
    """A fixed batch of real test texts padded to exactly `seq_len` tokens, so every stage is timed on
    the same shape."""
    rows = dataset[:batch_size]
    columns = [c for c in rows if c != 'labels']
    features = [{c: rows[c][i] for c in columns} for i in range(len(rows['input_ids']))]
    while len(features) < batch_size:  # tiny test splits: repeat rows to fill the batch
        features.append(features[len(features) % max(len(rows['input_ids']), 1)])
    return tokenizer.pad(features, padding='max_length', max_length=seq_len, return_tensors='pt')


def measure_latency(classifier, batch: dict, runs: int = 30, warmup: int = 3) -> Dict:
    """Wall-clock latency per batch (ms): mean and p50/p95/p99 over `runs` batches after `warmup`."""
    for _ in range(warmup):
        classifier.logits(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.logits(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    times = np.asarray(times)
    batch_size = int(batch['input_ids'].shape[0])
    return {
        'latency_ms_mean': float(times.mean()),
        'latency_ms_p50': float(np.percentile(times, 50)),
        'latency_ms_p95': float(np.percentile(times, 95)),
        'latency_ms_p99': float(np.percentile(times, 99)),
        'throughput_samples_s': float(batch_size * 1000.0 / times.mean()),
        'latency_batch_size': batch_size,
        'latency_seq_len': int(batch['input_ids'].shape[1]),
        'latency_device': classifier.device_name,
    }


# Run in a fresh interpreter by measure_peak_memory: the runtimes are imported first, then the model is
# loaded and predicts one batch; the kernel's record of the process's peak resident memory is read at the end.
_PEAK_MEMORY_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import onnxruntime, torch, transformers
import research_inference
def status_kb(field):
    with open('/proc/self/status') as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ':'))
runtime_kb = status_kb('VmRSS')
classifier = research_inference.load_compressed_model(sys.argv[2])
batch = classifier.tokenizer([sys.argv[5]] * int(sys.argv[3]), padding='max_length', truncation=True,
                             max_length=int(sys.argv[4]), return_tensors='pt')
classifier.logits(dict(batch))
# VmHWM belongs to this process's own memory map; ru_maxrss would start from the parent's RSS at fork.
peak_kb = status_kb('VmHWM')
result = {'peak_memory_mb': peak_kb / 1024, 'peak_memory_model_mb': (peak_kb - runtime_kb) / 1024}
if torch.cuda.is_available():
    result['peak_gpu_memory_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
print('PEAK_MEMORY ' + json.dumps(result))
"""


def measure_peak_memory(model_dir: str, batch_size: int, seq_len: int, text: str) -> Dict:
    """Peak memory of serving the saved model, measured where nothing else distorts it: a fresh Python
    process imports the runtimes (PyTorch, transformers, ONNX Runtime), loads `model_dir` and predicts one
    batch of `batch_size` copies of `text` padded to `seq_len` tokens. `peak_memory_mb` is that process's
    peak resident memory (what a deployment sees), `peak_memory_model_mb` the part above the runtimes
    alone; on CUDA `peak_gpu_memory_mb` is PyTorch's GPU allocator peak. Needs Linux (/proc); elsewhere,
    or if the child fails, the fields are None and the reason is printed - never a guess."""
    import json
    import subprocess
    import sys
    empty = {'peak_memory_mb': None, 'peak_memory_model_mb': None}
    if not os.path.exists('/proc/self/status'):
        print('[eval] peak memory not measured: needs Linux (/proc)')
        return empty
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, '-c', _PEAK_MEMORY_CHILD, here, model_dir, str(batch_size), str(seq_len), text],
                          capture_output=True, text=True, timeout=1800)
    line = next((l for l in proc.stdout.splitlines() if l.startswith('PEAK_MEMORY ')), None)
    if proc.returncode != 0 or line is None:
        reason = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        print(f'[eval] peak memory of {model_dir} not measured: {reason}')
        return empty
    return json.loads(line[len('PEAK_MEMORY '):])


def weight_statistics(classifier, pruned_layer_names: Sequence[str]) -> Dict:
    """Parameter counts and sparsity counted from the stored weights of the saved model: over the pruned
    (selected) Linear layers, and over every parameter of the model."""
    arrays = classifier.parameter_arrays()
    total = sum(a.size for a in arrays.values())
    nonzero = sum(int(np.count_nonzero(a)) for a in arrays.values())
    selected = [arrays[name] for name in pruned_layer_names if name in arrays]
    selected_total = sum(a.size for a in selected)
    selected_zero = sum(a.size - int(np.count_nonzero(a)) for a in selected)
    return {
        'params_total': int(total),
        'params_nonzero': int(nonzero),
        'sparsity_pruned_layers': float(selected_zero / selected_total) if selected_total else 0.0,
        'sparsity_overall': float(1 - nonzero / total) if total else 0.0,
    }


def evaluate_saved_model(classifier, model_dir: str, test_dataset, pruned_layer_names: Sequence[str],
                         threshold: float, latency_batch_size: int, seq_len: int, latency_runs: int) -> Dict:
    """Every metric of one stage, measured on the model as loaded back from `model_dir`."""
    labels, probs = predict_probabilities(classifier, test_dataset)
    result = quality_metrics(labels, probs, classifier.label_names, threshold)
    result['size_mb'] = size_on_disk_mb(model_dir)
    result.update(weight_statistics(classifier, pruned_layer_names))
    batch = latency_batch(test_dataset, classifier.tokenizer, latency_batch_size, seq_len)
    result.update(measure_latency(classifier, batch, runs=latency_runs))
    return result


def add_relative_metrics(stages: List[Dict]) -> List[Dict]:
    """compression_ratio (baseline size / stage size) and speedup (baseline p50 / stage p50) against the
    first stage, which is always the baseline teacher measured in the same run."""
    base = stages[0]
    for stage in stages:
        stage['compression_ratio'] = base['size_mb'] / stage['size_mb'] if stage['size_mb'] else None
        stage['speedup'] = base['latency_ms_p50'] / stage['latency_ms_p50'] if stage['latency_ms_p50'] else None
        stage['f1_macro_delta_vs_baseline'] = stage['f1_macro'] - base['f1_macro']
    return stages


def evaluate_stage(model_dir: str, linear_roles: Dict[str, str], data, settings) -> Dict:
    """Every metric of one stored stage, measured on the model loaded back from disk (what is reported is
    what was saved): quality on the test split, size, weights and sparsity, latency, peak memory."""
    classifier = load_compressed_model(model_dir)
    test = tokenized_splits(data, classifier.tokenizer, settings.max_length, settings.cache_dir).test
    result = {}
    if settings.measure_peak_memory:
        result.update(measure_peak_memory(model_dir, settings.latency_batch_size, settings.max_length,
                                          data.texts[int(data.test_idx[0])]))
        result['peak_memory_scope'] = (f'fresh process: runtimes imported, model loaded, one batch of '
                                       f'{settings.latency_batch_size} x {settings.max_length} tokens predicted')
    else:
        result.update({'peak_memory_mb': None, 'peak_memory_model_mb': None,
                       'peak_memory_scope': 'not measured (--no_peak_memory)'})
    result.update(evaluate_saved_model(classifier, model_dir, test, weight_names_in_group(linear_roles, settings.prune_layers),
                                       settings.threshold, settings.latency_batch_size, settings.max_length,
                                       settings.latency_runs))
    result.update(vocabulary_statistics(classifier.tokenizer, [data.texts[i] for i in data.test_idx], settings.max_length))
    return result


def vocabulary_statistics(tokenizer, test_texts: Sequence[str], max_length: int) -> Dict:
    """The vocabulary a stage reads with, and the share of the test split's tokens that are unknown to it
    (what --trim_vocab costs on words the training texts never used)."""
    stats = {'vocab_size': len(tokenizer), 'test_unknown_token_share': None}
    if getattr(tokenizer, 'is_fast', False):
        stats['test_unknown_token_share'] = unknown_token_share(tokenizer, test_texts, max_length)
    return stats
