"""Latency measurement on the stored stages of one run, two questions:

--mode flags (default): does the quick start still flag stages noisy on a quiet machine? Each repetition
measures the stages twice: the old rule (exactly --latency_runs rounds, flagged when IQR/median of a stage's
times or of its speed-up ratios exceeds 0.15) and the tool's rule now (rounds until every speed-up's 95%
interval is within --latency_tolerance, at most --latency_budget_s; flagged only when not converged).

--mode busy: do the reported speed-ups survive a busy machine? The same stages measured quiet and while
CPU-burning processes share the cores, with the tool's interleaved method and with the old method (each
stage timed on its own, one after the other), in alternating repetitions.

    python research_main.py --pipeline kd_prune_quant --save_all_stages --output_dir /tmp/noise_run ...
    python bench/bench_latency_noise.py --run_dir /tmp/noise_run --repeats 5            # flags, quiet machine
    python bench/bench_latency_noise.py --run_dir /tmp/noise_run --mode busy --repeats 3

Prints a markdown table and writes latency_flags.json / latency_noise.json into --run_dir.
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


# The old rule: a stage was flagged when either spread exceeded this (the former --latency_noise_bound).
OLD_NOISE_BOUND = 0.15


def old_rule_flags(folders, data, settings):
    """Exactly --latency_runs rounds, flagged by the former IQR/median rule."""
    from research_eval import measure_side_by_side
    fixed = settings.replace(latency_budget_s=0.0)
    measured = measure_side_by_side(folders, 'teacher', data, fixed)
    return {name: {'flagged': bool(m['latency_spread'] > OLD_NOISE_BOUND
                                   or m['speedup_iqr'] / m['speedup'] > OLD_NOISE_BOUND),
                   'latency_spread': m['latency_spread'], 'speedup': m['speedup'],
                   'rounds': m['latency_rounds'], 'seconds': m['latency_seconds']} for name, m in measured.items()}


def convergence_flags(folders, data, settings):
    """The tool's rule: timing until converged or the budget is spent; flagged when not converged."""
    from research_eval import measure_side_by_side
    measured = measure_side_by_side(folders, 'teacher', data, settings)
    return {name: {'flagged': m['latency_noisy'], 'speedup': m['speedup'], 'ci': [m['speedup_ci_low'], m['speedup_ci_high']],
                   'rounds': m['latency_rounds'], 'seconds': m['latency_seconds']} for name, m in measured.items()}


def run_flags(folders, data, settings, bench):
    found = {'old': [], 'new': []}
    for repeat in range(bench.repeats):
        found['old'].append(old_rule_flags(folders, data, settings))
        found['new'].append(convergence_flags(folders, data, settings))
        print(f'[bench] repeat {repeat + 1} of {bench.repeats} done', flush=True)
    print(f'\nStages of {bench.run_dir}; batch {settings.latency_batch_size} x {settings.max_length} tokens, 1 thread, '
          f'{os.cpu_count()} cores; {bench.repeats} repetitions. Old: {settings.latency_runs} rounds, flagged when '
          f'IQR/median > {OLD_NOISE_BOUND}. Now: until +-{settings.latency_tolerance:.0%} (95% interval), at most '
          f'{settings.latency_budget_s:g} s, flagged when not converged.\n')
    print('| stage | old: flagged | old: speed-up | now: flagged | now: speed-up [95% interval] | now: rounds | now: s |')
    print('|---|---|---|---|---|---|---|')
    for name in folders:
        old = [r[name] for r in found['old']]
        new = [r[name] for r in found['new']]
        mid = int(np.argsort([r['speedup'] for r in new])[len(new) // 2])
        print(f"| {name} | {sum(r['flagged'] for r in old)}/{len(old)} | {np.median([r['speedup'] for r in old]):.2f} | "
              f"{sum(r['flagged'] for r in new)}/{len(new)} | {new[mid]['speedup']:.2f} [{new[mid]['ci'][0]:.2f}, "
              f"{new[mid]['ci'][1]:.2f}] | {int(np.median([r['rounds'] for r in new]))} | "
              f"{np.median([r['seconds'] for r in new]):.1f} |")
    with open(os.path.join(bench.run_dir, 'latency_flags.json'), 'w', encoding='utf-8') as fh:
        json.dump(found, fh, indent=2)


def run_busy(folders, data, settings, bench):
    settings = settings.replace(latency_budget_s=0.0)   # the fixed rounds of this question
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




def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run_dir', required=True, help='Output folder of a run made with --save_all_stages.')
    parser.add_argument('--mode', choices=('flags', 'busy'), default='flags')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=30, help='--latency_runs: the old fixed count, now the minimum.')
    parser.add_argument('--budget_s', type=float, default=60.0, help='--latency_budget_s of the new rule.')
    parser.add_argument('--tolerance', type=float, default=0.05, help='--latency_tolerance of the new rule.')
    parser.add_argument('--burners', type=int, default=2)
    bench = parser.parse_args()
    from research_compression_config import settings_from_record
    from research_data import prepare_data
    with open(os.path.join(bench.run_dir, 'config.json'), encoding='utf-8') as fh:
        config = json.load(fh)
    with open(os.path.join(bench.run_dir, 'results_final.json'), encoding='utf-8') as fh:
        stages = json.load(fh)['stages']
    settings = settings_from_record(config).replace(latency_runs=bench.rounds, latency_threads=1,
                                                    latency_budget_s=bench.budget_s, latency_tolerance=bench.tolerance)
    data = prepare_data(settings.dataset_path, settings.text_column, settings.label_columns, settings.num_folds,
                        settings.eval_fold, settings.data_fraction, settings.val_fraction, settings.seed)
    folders = {'teacher' if i == 0 else s['stage']: s['model_dir'] for i, s in enumerate(stages)}
    (run_flags if bench.mode == 'flags' else run_busy)(folders, data, settings, bench)


if __name__ == '__main__':
    main()
