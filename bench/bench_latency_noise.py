"""Do the reported speed-ups survive a busy machine? The same stored stages measured quiet and while two
CPU-burning processes share the cores, with the tool's interleaved method and with the old method (each
stage timed on its own, one after the other), in alternating repetitions.

    python research_main.py --pipeline kd_prune_quant --save_all_stages --output_dir /tmp/noise_run ...
    python bench/bench_latency_noise.py --run_dir /tmp/noise_run --repeats 3

Prints each stage's speed-up against the teacher: quiet, busy, and busy/quiet - 1, for both methods.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def burn(stop):
    x = 0
    while not stop.is_set():
        for i in range(10000):
            x = (x * 31 + i) % 1000003


class Burners:
    """Two processes that keep two cores busy while the block runs."""

    def __init__(self, count=2):
        self.count = count

    def __enter__(self):
        self.stop = multiprocessing.Event()
        self.processes = [multiprocessing.Process(target=burn, args=(self.stop,)) for _ in range(self.count)]
        for p in self.processes:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.processes:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def sequential_speedups(folders, data, settings):
    """The old method: each stage timed alone (its own rounds), one stage after the other."""
    from research_eval import measure_side_by_side
    p50 = {}
    for name, folder in folders.items():
        p50[name] = measure_side_by_side({name: folder}, name, data, settings)[name]['latency_ms_p50']
    return {name: p50['teacher'] / p50[name] for name in folders}


def interleaved_speedups(folders, data, settings):
    from research_eval import measure_side_by_side
    measured = measure_side_by_side(folders, 'teacher', data, settings)
    return {name: measured[name]['speedup'] for name in folders}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run_dir', required=True, help='Output folder of a run made with --save_all_stages.')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=30)
    parser.add_argument('--burners', type=int, default=2)
    bench = parser.parse_args()
    from research_compression_config import settings_from_record
    from research_data import prepare_data
    with open(os.path.join(bench.run_dir, 'config.json'), encoding='utf-8') as fh:
        config = json.load(fh)
    with open(os.path.join(bench.run_dir, 'results_final.json'), encoding='utf-8') as fh:
        stages = json.load(fh)['stages']
    settings = settings_from_record(config).replace(latency_runs=bench.rounds, latency_threads=1)
    data = prepare_data(settings.dataset_path, settings.text_column, settings.label_columns, settings.num_folds,
                        settings.eval_fold, settings.data_fraction, settings.val_fraction, settings.seed)
    folders = {'teacher' if i == 0 else s['stage']: s['model_dir'] for i, s in enumerate(stages)}
    found = {method: {'quiet': [], 'busy': []} for method in ('interleaved', 'sequential')}
    for repeat in range(bench.repeats):
        for condition in ('quiet', 'busy'):
            for method, measure in (('interleaved', interleaved_speedups), ('sequential', sequential_speedups)):
                if condition == 'busy':
                    with Burners(bench.burners):
                        found[method][condition].append(measure(folders, data, settings))
                else:
                    found[method][condition].append(measure(folders, data, settings))
        print(f'[bench] repeat {repeat + 1} of {bench.repeats} done', flush=True)
    print(f'\nStages of {bench.run_dir}; batch {settings.latency_batch_size} x {settings.max_length} tokens, 1 thread, '
          f'{bench.rounds} rounds; busy = {bench.burners} CPU-burning processes on {os.cpu_count()} cores; '
          f'medians over {bench.repeats} repetitions (min-max in brackets)\n')
    print('| stage | method | speed-up quiet | speed-up busy | busy / quiet - 1 |')
    print('|---|---|---|---|---|')
    summary = {}
    for name in folders:
        if name == 'teacher':
            continue
        for method in ('interleaved', 'sequential'):
            quiet = np.array([r[name] for r in found[method]['quiet']])
            busy = np.array([r[name] for r in found[method]['busy']])
            change = np.median(busy) / np.median(quiet) - 1
            summary[f'{name}/{method}'] = {'quiet': quiet.tolist(), 'busy': busy.tolist(), 'change': float(change)}
            print(f'| {name} | {method} | {np.median(quiet):.2f} [{quiet.min():.2f}-{quiet.max():.2f}] | '
                  f'{np.median(busy):.2f} [{busy.min():.2f}-{busy.max():.2f}] | {change:+.1%} |')
    with open(os.path.join(bench.run_dir, 'latency_noise.json'), 'w', encoding='utf-8') as fh:
        json.dump(summary, fh, indent=2)


if __name__ == '__main__':
    main()
