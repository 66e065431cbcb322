"""Benchmark of knowledge distillation, in one run on one machine:

  * the epoch time of `logit` KD (teacher logits cached on disk) against plain fine-tuning of the same
    student, and the one-off cost of computing the teacher logits;
  * the test macro-F1 of the same student trained with each --kd_method against the same student
    fine-tuned without a teacher (same initial weights, seed, data, epochs and learning rate).

    flock /tmp/bench.lock python bench/bench_kd.py ../shared/data/bangla_cyberbullying_5label.csv \\
        --teacher_checkpoint /work/bench_runs/teacher/stages/baseline

The student is derived from the teacher (--student_layers, DistilBERT initialisation). The split is the
tool's own (prepare_data with --data_fraction/--num_folds/--eval_fold/--seed): use the values the teacher
was fine-tuned with, so the test rows were never seen by the teacher. The script checks this against the
teacher run's results_final.json when it finds one. --train_fraction trains on a stratified part of the
training rows only (validation and test stay whole) to keep the benchmark affordable on a small CPU.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402


class EpochTimer(TrainerCallback):
    """Wall time and this process's CPU time of each training epoch (the steps only: validation after the
    epoch is not counted). CPU time is less disturbed than wall time when other jobs share the machine."""

    def __init__(self):
        self.seconds, self.cpu_seconds = [], []
        self._start = self._cpu_start = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)


def parse_bench_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('dataset_path', help='CSV with the text column and 0/1 label columns.')
    parser.add_argument('--teacher_checkpoint', required=True, help='A fine-tuned classifier folder (head included).')
    parser.add_argument('--student_layers', default='3', help="Derived student: 'N' uniform layers or '0,2,5'.")
    parser.add_argument('--methods', default='logit,hidden,attention,multi_level')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--max_length', type=int, default=64)
    parser.add_argument('--data_fraction', type=float, default=0.4)
    parser.add_argument('--num_folds', type=int, default=5)
    parser.add_argument('--eval_fold', type=int, default=0)
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--train_fraction', type=float, default=1.0, help='Stratified part of the training rows used.')
    parser.add_argument('--cache_dir', default=os.path.join(ROOT, 'bench', 'out', 'cache'),
                        help='Tokenization cache (the teacher-logit cache of the timed runs is a fresh folder).')
    parser.add_argument('--json_out', default=os.path.join(ROOT, 'bench', 'out', 'bench_kd.json'))
    return parser.parse_args(argv)


def tool_arguments(bench, kd_method: str):
    """The tool's own resolved arguments for these settings (so every default is the CLI's)."""
    from research_compression_config import parse_compression_arguments
    return parse_compression_arguments([
        '--dataset_path', bench.dataset_path, '--author_name', 'bench', '--pipeline', 'kd_only',
        '--teacher_checkpoint', bench.teacher_checkpoint, '--student_layers', bench.student_layers,
        '--kd_method', kd_method, '--epochs', str(bench.epochs), '--lr', str(bench.lr), '--batch', str(bench.batch),
        '--max_length', str(bench.max_length), '--data_fraction', str(bench.data_fraction),
        '--num_folds', str(bench.num_folds), '--eval_fold', str(bench.eval_fold), '--seed', str(bench.seed),
        '--cache_dir', bench.cache_dir, '--output_dir', os.path.join(ROOT, 'bench', 'out', 'kd_work')])


def teacher_split_check(teacher_checkpoint: str, data) -> str:
    """Whether the teacher was fine-tuned on this very split (its run's results_final.json, if found)."""
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(teacher_checkpoint))), 'results_final.json')
    if not os.path.isfile(results):
        return 'not checked (no results_final.json beside the teacher checkpoint)'
    with open(results, encoding='utf-8') as fh:
        teacher_hash = json.load(fh).get('test_split_hash')
    if teacher_hash != data.test_split_hash:
        raise SystemExit(f'The teacher was evaluated on another test split ({teacher_hash}, here {data.test_split_hash}): '
                         'its training rows may include these test rows. Use the data settings the teacher was '
                         'fine-tuned with (--data_fraction, --num_folds, --eval_fold, --seed).')
    return f'same test split as the teacher run ({teacher_hash})'


def test_macro_f1(model, tokenizer, test_split, args) -> float:
    from research_eval import predict_probabilities, quality_metrics
    from research_inference import TorchClassifier
    classifier = TorchClassifier(model, tokenizer, args.label_columns, args.max_length, args.threshold, {})
    labels, probs = predict_probabilities(classifier, test_split)
    return quality_metrics(labels, probs, args.label_columns, args.threshold)['f1_macro']


def main(argv=None) -> int:
    bench = parse_bench_arguments(argv)
    from research_data import positive_class_weights, prepare_data, subsample, tokenized_splits
    from research_kd import cached_teacher_logits, derive_student_from_teacher, distill_student
    from research_models import load_fine_tuned_classifier
    from research_training import train_classifier

    base = tool_arguments(bench, 'logit')
    data = prepare_data(base.dataset_path, base.text_column, base.label_columns, base.num_folds, base.eval_fold,
                        base.data_fraction, base.val_fraction, base.seed)
    split_note = teacher_split_check(bench.teacher_checkpoint, data)
    if bench.train_fraction < 1.0:
        keep = subsample(data.labels[data.train_idx], bench.train_fraction, bench.seed)
        data.train_idx = data.train_idx[keep]
    pos_weight = positive_class_weights(data.labels[data.train_idx])
    teacher, tokenizer = load_fine_tuned_classifier(bench.teacher_checkpoint, base.label_columns)
    splits = tokenized_splits(data, tokenizer, base.max_length, base.cache_dir)
    from research_kd import parse_student_layers
    initial_student = derive_student_from_teacher(teacher, parse_student_layers(bench.student_layers))
    rows = {}
    work = tempfile.mkdtemp(prefix='bench_kd_')

    def run(name, train):
        set_seed(bench.seed)
        timer = EpochTimer()
        started = time.perf_counter()
        model = train(copy.deepcopy(initial_student), timer)
        rows[name] = {'epoch_s': timer.seconds, 'epoch_cpu_s': timer.cpu_seconds, 'train_s': time.perf_counter() - started,
                      'test_f1_macro': test_macro_f1(model, tokenizer, splits.test, base)}
        print(f'[bench] {name}: epochs {[round(s, 1) for s in timer.seconds]} s, test macro-F1 {rows[name]["test_f1_macro"]:.4f}',
              flush=True)

    # Plain fine-tuning of the student: labels only, no teacher.
    run('no teacher', lambda student, timer: train_classifier(
        student, tokenizer, splits.train, splits.val, pos_weight, base, os.path.join(work, 'plain'), base.epochs, base.lr,
        callbacks=[timer]))

    # The teacher logits once (cache miss, timed), then a read from the cache (hit, timed).
    logit_cache = tempfile.mkdtemp(prefix='bench_kd_logits_')
    started = time.perf_counter()
    _, hit = cached_teacher_logits(teacher, tokenizer, splits.train, data, base.max_length, logit_cache)
    miss_s = time.perf_counter() - started
    started = time.perf_counter()
    _, hit_again = cached_teacher_logits(teacher, tokenizer, splits.train, data, base.max_length, logit_cache)
    hit_s = time.perf_counter() - started
    assert not hit and hit_again

    for method in bench.methods.split(','):
        args = tool_arguments(bench, method).replace(cache_dir=logit_cache)
        run(method, lambda student, timer, args=args: distill_student(
            student, tokenizer, splits, teacher, tokenizer, splits, data, pos_weight, args,
            os.path.join(work, method), callbacks=[timer])[0])

    teacher_f1 = test_macro_f1(teacher, tokenizer, splits.test, base)
    plain = rows['no teacher']
    plain_epoch, plain_cpu = float(np.median(plain['epoch_s'])), float(np.median(plain['epoch_cpu_s']))
    print('\n' + '=' * 78)
    print(f'Data: {bench.dataset_path}  fraction={bench.data_fraction} fold {bench.eval_fold}/{bench.num_folds} '
          f'seed={bench.seed}; train rows {len(data.train_idx)} (train_fraction {bench.train_fraction}), '
          f'validation {len(data.val_idx)}, test {len(data.test_idx)}; {split_note}')
    print(f'Teacher: {bench.teacher_checkpoint} ({teacher.config.num_hidden_layers} layers), test macro-F1 {teacher_f1:.4f}')
    print(f'Student: derived, layers {initial_student.config.derived_from_teacher_layers}; epochs={bench.epochs} '
          f'lr={bench.lr} batch={bench.batch} max_length={bench.max_length} alpha={base.kd_alpha} T={base.kd_temperature} '
          f'hidden_w={base.hidden_loss_weight} attention_w={base.attention_loss_weight}')
    print(f'Teacher logits for {len(data.train_idx)} training rows: {miss_s:.1f} s once (cache miss), '
          f'{hit_s:.2f} s when read from the cache')
    print()
    print('| student trained with | epoch wall time (median) | wall / no teacher | epoch CPU time (median) | '
          'CPU / no teacher | test macro-F1 | vs no teacher |')
    print('|---|---|---|---|---|---|---|')
    for name, row in rows.items():
        epoch, cpu = float(np.median(row['epoch_s'])), float(np.median(row['epoch_cpu_s']))
        print(f'| {name} | {epoch:.1f} s | {epoch / plain_epoch:.2f}x | {cpu:.1f} s | {cpu / plain_cpu:.2f}x | '
              f'{row["test_f1_macro"]:.4f} | {row["test_f1_macro"] - plain["test_f1_macro"]:+.4f} |')
    print('=' * 78)
    os.makedirs(os.path.dirname(bench.json_out), exist_ok=True)
    with open(bench.json_out, 'w', encoding='utf-8') as fh:
        json.dump({'settings': vars(bench), 'teacher_test_f1_macro': teacher_f1, 'teacher_logits_miss_s': miss_s,
                   'teacher_logits_hit_s': hit_s, 'rows': rows, 'split': split_note}, fh, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
