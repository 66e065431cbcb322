"""Pruning benchmark: every --prune_method at several sparsities on the real data, in one run.

For each (method, sparsity): prune a copy of the fine-tuned teacher, fine-tune it (prune_and_fine_tune,
exactly what the pipeline runs), save it (research_inference.save_hf), load it back (load_compressed_model),
and measure from the saved model: test macro-F1 and its retention against the unpruned teacher, sparsity
and removed weights of the pruned layers, size on disk, and CPU latency against the unpruned teacher,
timed alternately (dense, pruned, dense, ...) in the same window so a busy machine affects both alike.

    flock /tmp/bench.lock python bench/bench_pruning.py \\
        --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \\
        --teacher_checkpoint /work/bench_runs/teacher/stages/baseline --output_dir /tmp/bench_pruning

The split settings default to the ones the shared teacher checkpoint was trained with (data fraction 0.4,
5 folds, fold 0, seed 42, max length 64), so its test split is unseen by the teacher.
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def parse_bench_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--dataset_path', required=True, help='The real CSV, e.g. ../shared/data/bangla_cyberbullying_5label.csv')
    parser.add_argument('--teacher_checkpoint', required=True, help='Fine-tuned classifier folder to prune.')
    parser.add_argument('--output_dir', default='bench_pruning_out', help='Pruned models and results.json go here.')
    parser.add_argument('--methods', default='magnitude,wanda,gradual,structured')
    parser.add_argument('--sparsities', default='0.3,0.5,0.7')
    parser.add_argument('--prune_layers', default='encoder')
    parser.add_argument('--data_fraction', default='0.4')
    parser.add_argument('--num_folds', default='5')
    parser.add_argument('--eval_fold', default='0')
    parser.add_argument('--seed', default='42')
    parser.add_argument('--max_length', default='64')
    parser.add_argument('--fine_tune_epochs', default='1')
    parser.add_argument('--fine_tune_lr', default='5e-5')
    parser.add_argument('--batch', default='32')
    parser.add_argument('--calibration_samples', default='256')
    parser.add_argument('--prune_frequency', default='2', help='Gradual pruning: steps between mask updates.')
    parser.add_argument('--max_train_texts', type=int, default=0,
                        help='Fine-tune on only the first N training texts (0 = the whole training split).')
    parser.add_argument('--latency_batch_size', type=int, default=1)
    parser.add_argument('--latency_rounds', type=int, default=40, help='Timed (dense, pruned) pairs per row.')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads for the whole run. 1 keeps timings stable on a shared machine: '
                             'with 2 threads on 2 busy cores, oversubscription made latencies swing 5-10x.')
    parser.add_argument('--cache_dir', default=os.path.join(ROOT, 'cache'))
    return parser.parse_args(argv)


def pipeline_arguments(bench):
    """The run's arguments as research_main would resolve them (prune_only pipeline)."""
    from research_compression_config import parse_compression_arguments
    return parse_compression_arguments([
        '--pipeline', 'prune_only', '--dataset_path', bench.dataset_path, '--author_name', 'bench',
        '--teacher_checkpoint', bench.teacher_checkpoint, '--data_fraction', bench.data_fraction,
        '--num_folds', bench.num_folds, '--eval_fold', bench.eval_fold, '--seed', bench.seed,
        '--max_length', bench.max_length, '--fine_tune_epochs', bench.fine_tune_epochs,
        '--fine_tune_lr', bench.fine_tune_lr, '--batch', bench.batch, '--calibration_samples', bench.calibration_samples,
        '--prune_frequency', bench.prune_frequency,
        '--prune_layers', bench.prune_layers, '--output_dir', bench.output_dir, '--overwrite_output_dir',
        '--cache_dir', bench.cache_dir])


def paired_latency_ms(dense, pruned, batch, rounds: int):
    """Median wall-clock ms per batch of two classifiers, timed alternately after 3 warm-up batches each."""
    for _ in range(3):
        dense.logits(batch)
        pruned.logits(batch)
    times = {'dense': [], 'pruned': []}
    for _ in range(rounds):
        for name, classifier in (('dense', dense), ('pruned', pruned)):
            start = time.perf_counter()
            classifier.logits(batch)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times['dense'])), float(np.median(times['pruned']))


def test_macro_f1(classifier, test_dataset, args) -> float:
    from research_eval import predict_probabilities, quality_metrics
    labels, probs = predict_probabilities(classifier, test_dataset)
    return quality_metrics(labels, probs, args.label_columns, args.threshold)['f1_macro']


def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def markdown_table(rows, dense) -> str:
    lines = [f'Unpruned teacher: test macro-F1 {dense["f1_macro"]:.4f}, {dense["size_mb"]:.1f} MB, '
             f'{dense["params_total"]:,} parameters.', '',
             '| method | target | zeros in pruned layers | weights removed | F1 right after pruning | F1 after fine-tune '
             '| F1 retention | size MB (ratio) | latency ms (ratio) |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f'| {r["method"]} | {r["target"]:.0%} | {r["sparsity_pruned_layers"]:.1%} | {r["weights_removed_pruned_layers"]:.1%} '
            f'| {fmt(r["f1_macro_after_pruning"], ".4f")} | {r["f1_macro"]:.4f} | {r["f1_retention"]:.3f} '
            f'| {r["size_mb"]:.1f} ({r["size_ratio"]:.2f}) | {r["latency_ms"]:.2f} ({r["latency_ratio"]:.2f}) |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    import torch
    from transformers import set_seed
    from research_data import positive_class_weights, prepare_data, tokenized_splits
    from research_data import batches_of
    from research_eval import latency_batch, size_on_disk_mb, weight_statistics
    from research_inference import TorchClassifier, load_compressed_model, save_hf
    from research_models import load_fine_tuned_classifier
    from research_models import selected_weight_names
    from research_pruning import prune_and_fine_tune

    bench = parse_bench_arguments(argv)
    torch.set_num_threads(bench.threads)
    args = pipeline_arguments(bench)
    os.makedirs(bench.output_dir, exist_ok=True)
    started = time.time()
    print(f'[bench] {time.strftime("%Y-%m-%d %H:%M")} torch threads {torch.get_num_threads()}, settings: '
          + json.dumps({k: v for k, v in vars(bench).items()}), flush=True)

    # One data/calibration/evaluation setup shared by every row.
    set_seed(args.seed)
    data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, args.eval_fold,
                        args.data_fraction, args.val_fraction, args.seed)
    teacher, tokenizer = load_fine_tuned_classifier(args.teacher_checkpoint, args.label_columns)
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    if bench.max_train_texts:
        splits.train = splits.train.select(range(min(bench.max_train_texts, len(splits.train))))
    pos_weight = positive_class_weights(data.labels[data.train_idx])
    info = {'stage': 'prune', 'pipeline': 'prune_only', 'label_names': list(args.label_columns),
            'max_length': args.max_length, 'threshold': args.threshold}

    dense_dir = os.path.join(bench.output_dir, 'dense')
    save_hf(dense_dir, teacher, tokenizer, info)
    dense = load_compressed_model(dense_dir)
    batch = latency_batch(splits.test, tokenizer, bench.latency_batch_size, args.max_length)
    dense_stats = {'f1_macro': test_macro_f1(dense, splits.test, args), 'size_mb': size_on_disk_mb(dense_dir),
                   **weight_statistics(dense, selected_weight_names(teacher, args.prune_layers))}
    print(f'[bench] unpruned: test macro-F1 {dense_stats["f1_macro"]:.4f}, {dense_stats["size_mb"]:.1f} MB; train '
          f'{len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} texts', flush=True)

    rows = []
    for method in bench.methods.split(','):
        for sparsity in [float(s) for s in bench.sparsities.split(',')]:
            row_started = time.time()
            args = args.replace(prune_method=method, prune_sparsity=sparsity)
            set_seed(args.seed)
            model, report = prune_and_fine_tune(copy.deepcopy(teacher), tokenizer, splits, pos_weight, args,
                                                os.path.join(bench.output_dir, 'work'), args.seed)
            model_dir = os.path.join(bench.output_dir, f'{method}_{int(round(sparsity * 100))}')
            save_hf(model_dir, model, tokenizer, info)
            saved = load_compressed_model(model_dir)
            stats = weight_statistics(saved, selected_weight_names(model, args.prune_layers))
            check = next(iter(batches_of(splits.test, tokenizer, 64)))
            in_memory = TorchClassifier(model, tokenizer, args.label_columns, args.max_length, args.threshold, {})
            reload_error = float(np.abs(saved.logits(check) - in_memory.logits(check)).max())
            if reload_error > 1e-4:
                raise RuntimeError(f'{model_dir} predicts differently after reloading (max |logit diff| {reload_error})')
            dense_ms, pruned_ms = paired_latency_ms(dense, saved, batch, bench.latency_rounds)
            # The reloaded model gives the same logits, so its test macro-F1 is the one measured after fine-tuning.
            f1 = report['f1_macro_after_fine_tune'] if report['f1_macro_after_fine_tune'] is not None else \
                test_macro_f1(saved, splits.test, args)
            row = {'method': method, 'target': sparsity, 'f1_macro': f1, 'reload_max_logit_diff': reload_error,
                   'size_mb': size_on_disk_mb(model_dir), 'latency_ms': pruned_ms, 'dense_latency_ms': dense_ms,
                   **stats, **report}
            row['f1_retention'] = row['f1_macro'] / dense_stats['f1_macro']
            row['size_ratio'] = row['size_mb'] / dense_stats['size_mb']
            row['latency_ratio'] = pruned_ms / dense_ms
            row['seconds'] = time.time() - row_started
            rows.append(row)
            print(f'[bench] {method} {sparsity:.0%}: F1 {row["f1_macro"]:.4f} (retention {row["f1_retention"]:.3f}), '
                  f'{row["size_mb"]:.1f} MB ({row["size_ratio"]:.2f}x), latency {pruned_ms:.2f} vs {dense_ms:.2f} ms '
                  f'({row["latency_ratio"]:.2f}x), {row["seconds"]:.0f} s', flush=True)
            with open(os.path.join(bench.output_dir, 'results.json'), 'w', encoding='utf-8') as fh:
                json.dump({'settings': vars(bench), 'dense': dense_stats, 'rows': rows}, fh, indent=2, default=str)
            del model, saved

    print('\n' + markdown_table(rows, dense_stats))
    print(f'\n[bench] done in {time.time() - started:.0f} s; latency: batch {bench.latency_batch_size} x '
          f'{args.max_length} tokens, median of {bench.latency_rounds} alternating runs, CPU, '
          f'{torch.get_num_threads()} torch threads')
    return 0


if __name__ == '__main__':
    sys.exit(main())
