"""Evaluation: quality metrics (multi-label), efficiency metrics measured on the saved artifact, the
evaluation of a stored stage, and the comparison of every stage against the baseline. One place computes
each metric; the results JSON/CSV, the ablation table and the model card all read these dictionaries.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support,
                             roc_auc_score)

from research_batching import in_text_order, length_sorted_batches
from research_data import tokenized_splits
from research_files import write_json_atomically
from research_inference import OnnxClassifier, TorchClassifier, export_to_onnx, load_compressed_model, sigmoid
from research_latency import (MIN_CYCLES, WEIGHT_FILE_SUFFIXES, compressed_size_mb, cycle_ratio, intra_op_threads,
                              make_timer, measure_interleaved)
from research_models import folder_fingerprint, weight_names_in_group
from research_stats import PREDICTIONS, threshold_vector, tune_thresholds
from research_vocab import unknown_token_share



def quality_metrics(y_true: np.ndarray, probs: np.ndarray, label_names: Sequence[str], threshold=0.5) -> Dict:
    """F1 macro/micro/weighted, exact match, Hamming loss, ROC-AUC (macro over labels where both classes
    occur) and per-label precision/recall/F1/ROC-AUC, at a decision threshold (one for every label, or an
    array of one per label)."""
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
    """(labels, probabilities) of a classifier from `research_inference` on a tokenized split, in the split's
    row order (batches are sorted by length, so each pads to nearly its own texts' length)."""
    labels, probs = [], []
    for rows, batch in length_sorted_batches(dataset, classifier.tokenizer, batch_size):
        labels.append((rows, batch.pop('labels').numpy()))
        probs.append((rows, sigmoid(classifier.logits(batch))))
    return in_text_order(labels, len(dataset)), in_text_order(probs, len(dataset))


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


# Run in a fresh interpreter: the runtimes are imported first, then research_inference.peak_memory_probe loads
# the model, predicts one batch and reads the kernel's record of this process's own peak resident memory.
_PEAK_MEMORY_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import onnxruntime, torch, transformers
import research_inference
print('PEAK_MEMORY ' + json.dumps(research_inference.peak_memory_probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                                        sys.argv[5])))
"""


def measure_peak_memory(model_dirs: Sequence[str], batch_size: int, seq_len: int, text: str) -> Dict[str, Dict]:
    """Peak memory of serving each saved model, measured where nothing else distorts it: a fresh Python
    process per model imports the runtimes (PyTorch, transformers, ONNX Runtime), loads the folder and
    predicts one batch of `batch_size` copies of `text` padded to `seq_len` tokens. `peak_memory_mb` is that
    process's peak resident memory (what a deployment sees), `peak_memory_model_mb` the part above the
    runtimes alone; on CUDA `peak_gpu_memory_mb` is PyTorch's GPU allocator peak. The processes run as many
    at a time as there are cores (each measures only itself). Needs Linux (/proc); elsewhere, or if a child
    fails, the fields are None and the reason is printed - never a guess."""
    empty = {'peak_memory_mb': None, 'peak_memory_model_mb': None}
    if not os.path.exists('/proc/self/status'):
        print('[eval] peak memory not measured: needs Linux (/proc)')
        return {d: dict(empty) for d in model_dirs}
    here = os.path.dirname(os.path.abspath(__file__))
    pending, running, results = list(model_dirs), {}, {}
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            model_dir = pending.pop(0)
            running[model_dir] = subprocess.Popen(
                [sys.executable, '-c', _PEAK_MEMORY_CHILD, here, model_dir, str(batch_size), str(seq_len), text],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        model_dir, child = next(iter(running.items()))
        stdout, stderr = child.communicate(timeout=1800)
        del running[model_dir]
        line = next((l for l in stdout.splitlines() if l.startswith('PEAK_MEMORY ')), None)
        if child.returncode != 0 or line is None:
            print(f'[eval] peak memory of {model_dir} not measured: {(stderr.strip().splitlines() or ["no output"])[-1]}')
            results[model_dir] = dict(empty)
        else:
            results[model_dir] = json.loads(line[len('PEAK_MEMORY '):])
    return results


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


def evaluate_saved_model(classifier, model_dir: str, splits, pruned_layer_names: Sequence[str], settings) -> Dict:
    """Quality, size and weights of one stage, measured on the model as loaded back from `model_dir`: the test
    metrics at the stage's thresholds (`stage_thresholds`), macro-F1 at --threshold beside them, and the test
    predictions the run's statistics read (research_stats.PREDICTIONS, removed before anything is written)."""
    labels, probs = predict_probabilities(classifier, splits.test)
    thresholds = stage_thresholds(classifier, splits.val, settings)
    cut = threshold_vector(thresholds, classifier.label_names)
    result = quality_metrics(labels, probs, classifier.label_names, cut)
    result['thresholds'] = thresholds
    result['test_texts'] = int(len(labels))
    result['threshold_strategy'] = settings.threshold_strategy
    result['f1_macro_at_default_threshold'] = (
        quality_metrics(labels, probs, classifier.label_names, settings.threshold)['f1_macro']
        if settings.threshold_strategy != 'fixed' else result['f1_macro'])
    result[PREDICTIONS] = (labels.astype(np.int8), (probs >= cut).astype(np.int8), probs)
    result['size_mb'] = size_on_disk_mb(model_dir)
    result.update(weight_statistics(classifier, pruned_layer_names))
    return result


def stage_thresholds(classifier, validation, settings) -> Dict[str, float]:
    """{label: decision threshold} of one stage: --threshold for every label (--threshold_strategy fixed), or
    each label's F1-optimal threshold on this stage's own VALIDATION predictions (per_label; a label with fewer
    than --min_threshold_positives validation positives keeps --threshold). Computed at evaluation, so the
    threshold is no part of a stored stage's identity; the test split never enters."""
    if settings.threshold_strategy == 'fixed':
        return {name: float(settings.threshold) for name in classifier.label_names}
    labels, probs = predict_probabilities(classifier, validation)
    return tune_thresholds(labels, probs, classifier.label_names, settings.threshold, settings.min_threshold_positives)


# ---------------------------------------------------------------------------------------------
# Measurements that only depend on a stored stage's files (verified by checksum on every reuse) and on this
# machine's runtimes are kept per stage key in <cache_dir>/measurements/<key>.json, so re-running a stored
# plan does not pay for them again: the zipped size, and the peak memory (keyed by host, runtime versions,
# batch and length), both also keyed by the folder's file names, sizes and times (a rebuilt stage is measured
# again). Quality and latency are measured in every run.
# ---------------------------------------------------------------------------------------------

MEASUREMENTS_DIR = 'measurements'


def runtime_fingerprint(*details) -> str:
    """This machine and runtime versions (plus `details`): a cached peak memory holds only where they match."""
    import onnxruntime
    import transformers
    return json.dumps([platform.node(), sys.version.split()[0], torch.__version__, onnxruntime.__version__,
                       transformers.__version__, *details])


def cached_measurements(cache_dir: str, stage_key: str, what: str, fingerprint: str) -> Optional[Dict]:
    """The stored `what` of a stage if it was measured under the same fingerprint (None when absent or damaged)."""
    try:
        with open(os.path.join(cache_dir, MEASUREMENTS_DIR, f'{stage_key}.json'), encoding='utf-8') as fh:
            entry = json.load(fh)[what]
        return entry['value'] if entry['fingerprint'] == fingerprint and isinstance(entry['value'], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_measurements(cache_dir: str, stage_key: str, what: str, fingerprint: str, value: Dict) -> None:
    path = os.path.join(cache_dir, MEASUREMENTS_DIR, f'{stage_key}.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, encoding='utf-8') as fh:
            record = json.load(fh)
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        record = {}
    record[what] = {'fingerprint': fingerprint, 'value': value}
    write_json_atomically(path, record)


def zipped_size(model_dir: str, stage_key: str, cache_dir: str) -> Dict:
    """size_mb_compressed of a stored stage (see research_latency.compressed_size_mb), measured once per key."""
    fingerprint = json.dumps(['deflate-6', folder_fingerprint(model_dir)])   # a rebuilt stage is measured again
    found = cached_measurements(cache_dir, stage_key, 'zipped_size', fingerprint)
    if found is None:
        found = {'size_mb_compressed': compressed_size_mb(model_dir)}
        store_measurements(cache_dir, stage_key, 'zipped_size', fingerprint, found)
    return found


def add_relative_metrics(stages: List[Dict]) -> List[Dict]:
    """compression_ratio (baseline size / stage size, raw and zip-compressed) and the macro-F1 delta against
    the first stage, the baseline teacher of the same run. The speed-up comes from the side-by-side latency
    measurement (`measure_side_by_side`), never from two separate timings."""
    base = stages[0]
    for stage in stages:
        stage['compression_ratio'] = base['size_mb'] / stage['size_mb'] if stage['size_mb'] else None
        stage['compression_ratio_compressed'] = (base['size_mb_compressed'] / stage['size_mb_compressed']
                                                 if stage['size_mb_compressed'] else None)
        stage['f1_macro_delta_vs_baseline'] = stage['f1_macro'] - base['f1_macro']
    return stages


def evaluate_stage(model_dir: str, linear_roles: Dict[str, str], prune_layers: str, data, settings,
                   stage_key: str) -> Dict:
    """Every metric of one stored stage but its latency and peak memory, measured on the model loaded back
    from disk (what is reported is what was saved): quality on the test split, size, weights and sparsity,
    vocabulary. Latency is measured for all stages of a run together (`measure_side_by_side`), peak memory in
    a fresh process per stage (`peak_memory_of_stages`)."""
    classifier = load_compressed_model(model_dir)
    splits = tokenized_splits(data, classifier.tokenizer, settings.max_length, settings.cache_dir)
    result = evaluate_saved_model(classifier, model_dir, splits, weight_names_in_group(linear_roles, prune_layers), settings)
    result.update(vocabulary_statistics(classifier.tokenizer, [data.texts[i] for i in data.test_idx], settings.max_length))
    result.update(zipped_size(model_dir, stage_key, settings.cache_dir))
    return result


def vocabulary_statistics(tokenizer, test_texts: Sequence[str], max_length: int) -> Dict:
    """The vocabulary a stage reads with, and the share of the test split's tokens that are unknown to it
    (what --trim_vocab costs on words the training texts never used)."""
    stats = {'vocab_size': len(tokenizer), 'test_unknown_token_share': None}
    if getattr(tokenizer, 'is_fast', False):
        stats['test_unknown_token_share'] = unknown_token_share(tokenizer, test_texts, max_length)
    return stats


# ---------------------------------------------------------------------------------------------
# Latency: every stage of a run timed together, in interleaved rounds, with one thread policy
# ---------------------------------------------------------------------------------------------

def measure_side_by_side(model_dirs: Dict[str, str], baseline: str, data, settings,
                         parents: Optional[Dict[str, str]] = None) -> Dict[str, Dict]:
    """Latency of every stage in `model_dirs` ({name: folder}), measured together: each loaded from disk,
    given the same batch of real test texts padded to `max_length` tokens (in its own tokenization), run with
    `--latency_threads` intra-op threads in PyTorch and ONNX Runtime alike, timed once per round in
    at least `--latency_runs` rounds with the order rotated (research_latency.measure_interleaved), then on
    until every speed-up's 95% interval is within `--latency_tolerance` or `--latency_budget_s` is spent. The
    speed-up against `baseline` is the median over rotation cycles of the time ratio, with its interval and
    IQR; a stage that did not converge is flagged and warned about.

    `parents` ({stage name: folder of the PyTorch model it was made from}): for a stage that changed the
    runtime (an ONNX Runtime model made from a PyTorch one), its parent exported to ONNX at fp32 is timed in
    the same rounds, so the runtime's gain and the quantization's own gain are reported separately."""
    threads = settings.latency_threads
    timers, described, fp32_onnx_references = {}, {}, {}
    with intra_op_threads(threads), tempfile.TemporaryDirectory(prefix='fp32_onnx_') as scratch:
        for name, model_dir in model_dirs.items():
            classifier = load_compressed_model(model_dir).set_threads(threads)
            timers[name] = make_timer(classifier, _latency_batch_for(classifier.tokenizer, data, settings))
            described[name] = classifier.device_name
            if isinstance(classifier, OnnxClassifier) and (parents or {}).get(name):
                fp32_onnx_references[name] = parents[name]
        for name, parent_dir in fp32_onnx_references.items():
            parent = load_compressed_model(parent_dir)
            onnx_path = os.path.join(scratch, f'{len(timers)}.onnx')
            export_to_onnx(parent.model, parent.tokenizer, onnx_path, settings.max_length)
            reference = OnnxClassifier(onnx_path, parent.tokenizer, parent.label_names, parent.max_length,
                                       parent.threshold, {}, threads=threads)
            timers[f'{name} (fp32 ONNX reference)'] = make_timer(reference, _latency_batch_for(parent.tokenizer, data, settings))
        # At least MIN_CYCLES whole rotations: the speed-up is a median over cycles and its interval needs several.
        rounds = max(settings.latency_runs, MIN_CYCLES * len(timers))
        timed = measure_interleaved(timers, rounds=rounds, warmup=3, baseline=baseline,
                                    budget_s=settings.latency_budget_s, tolerance=settings.latency_tolerance,
                                    seed=settings.seed)
    print(convergence_line(timed, settings))
    results = {}
    for name in model_dirs:
        result = dict(timed[name])
        result.update({'latency_threads': threads, 'latency_batch_size': settings.latency_batch_size,
                       'latency_seq_len': settings.max_length, 'latency_device': described[name],
                       'throughput_samples_s': settings.latency_batch_size * 1000.0 / result['latency_ms_mean']})
        reference_name = f'{name} (fp32 ONNX reference)'
        if reference_name in timed:
            reference, parent_dir = timed[reference_name], fp32_onnx_references[name]
            parent_name = next((n for n, d in model_dirs.items() if d == parent_dir), None)
            own = cycle_ratio(reference, timed[name])
            result.update({'speedup_includes_runtime_change': True,
                           'latency_ms_p50_fp32_onnx_reference': reference['latency_ms_p50'],
                           'speedup_vs_fp32_onnx': own['ratio'], 'speedup_vs_fp32_onnx_iqr': own['iqr'],
                           'speedup_vs_fp32_onnx_ci_low': own['ci_low'], 'speedup_vs_fp32_onnx_ci_high': own['ci_high']})
            if parent_name is not None:
                runtime = cycle_ratio(timed[parent_name], reference)
                result.update({'runtime_speedup_onnx_vs_pytorch': runtime['ratio'],
                               'runtime_speedup_onnx_vs_pytorch_iqr': runtime['iqr'],
                               'runtime_speedup_onnx_vs_pytorch_ci_low': runtime['ci_low'],
                               'runtime_speedup_onnx_vs_pytorch_ci_high': runtime['ci_high']})
        result.pop('cycle_seconds')
        if result['latency_noisy']:
            print(f'[latency] warning: {result["latency_warning"]}')
        results[name] = result
    return results


def convergence_line(timed: Dict[str, Dict], settings) -> str:
    """The [eval] line saying how long the timing took and whether every number converged."""
    first = next(iter(timed.values()))
    unsettled = [name for name, result in timed.items() if not result['latency_converged']]
    verdict = (f"every speed-up's 95% interval within +-{settings.latency_tolerance:.0%}" if not unsettled else
               f"{len(unsettled)} did not converge within the {settings.latency_budget_s:g} s budget "
               f"({', '.join(unsettled)}): flagged noisy")
    return (f"[eval] latency: {len(timed)} stage(s) timed together in {first['latency_rounds']} rounds "
            f"({first['latency_rounds'] // len(timed)} rotation cycles), {first['latency_seconds']:.1f} s; {verdict}")


def _latency_batch_for(tokenizer, data, settings) -> dict:
    test = tokenized_splits(data, tokenizer, settings.max_length, settings.cache_dir).test
    return latency_batch(test, tokenizer, settings.latency_batch_size, settings.max_length)


def peak_memory_of_stages(model_dirs: Dict[str, str], data, settings) -> Dict[str, Dict]:
    """Peak memory of every stage ({stage key: folder}), or the reason it was not measured (--no_peak_memory);
    measured once per stage, machine, runtime versions, batch and length, and then reused."""
    if not settings.measure_peak_memory:
        return {name: {'peak_memory_mb': None, 'peak_memory_model_mb': None,
                       'peak_memory_scope': 'not measured (--no_peak_memory)'} for name in model_dirs}
    text = data.texts[int(data.test_idx[0])]
    scope = (f'fresh process: runtimes imported, model loaded, one batch of {settings.latency_batch_size} x '
             f'{settings.max_length} tokens predicted')
    fingerprints = {key: runtime_fingerprint(settings.latency_batch_size, settings.max_length, text,
                                             folder_fingerprint(folder)) for key, folder in model_dirs.items()}
    results = {key: cached_measurements(settings.cache_dir, key, 'peak_memory', fingerprints[key]) for key in model_dirs}
    missing = [key for key, found in results.items() if found is None]
    measured = measure_peak_memory([model_dirs[key] for key in missing], settings.latency_batch_size,
                                   settings.max_length, text)
    for key in missing:
        results[key] = measured[model_dirs[key]]
        if results[key]['peak_memory_mb'] is not None:
            store_measurements(settings.cache_dir, key, 'peak_memory', fingerprints[key], results[key])
    return {key: {**found, 'peak_memory_scope': scope} for key, found in results.items()}
