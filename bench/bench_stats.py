"""What the statistics (bootstrap intervals, paired tests, per-label thresholds) add to the evaluation of an
eight-pipeline ablation (goal: at most 10 %).

    python bench/bench_stats.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \
        --teacher_checkpoint /path/to/fine-tuned/teacher --workdir /tmp/bench_stats --rounds 5 -- \
        --data_fraction 0.4 --max_length 64 --batch 32 --lr 1e-4 --student_layers 3 --epochs 2 --fine_tune_epochs 1

First the ablation is run once (untimed) so that every stage is in the store; then, in this process with a
fixed number of threads, the evaluation of all stored stages (research_main.evaluate_side_by_side: quality,
size, latency, statistics) is timed with --bootstrap_resamples 0 and with the statistics on, alternating
in every round (off, on / on, off) so drift on the machine hits both alike. Prints the median of each, their
ratio, and the time of research_stats.add_statistics alone. Extra arguments after `--` go to research_main.py
(e.g. `-- --threshold_strategy per_label --data_fraction 0.4 --max_length 64`).
"""

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def common_arguments(parsed, extra):
    teacher = (['--teacher_checkpoint', parsed.teacher_checkpoint] if parsed.teacher_checkpoint
               else ['--teacher_path', parsed.teacher_path])
    return ['--dataset_path', parsed.dataset_path, '--author_name', 'bench', '--run_ablation', '--cache_dir',
            os.path.join(parsed.workdir, 'cache'), '--no_peak_memory', '--latency_threads', str(parsed.threads),
            *teacher, *extra]


def fill_store(argv, output_dir):
    """Run the ablation once so every stage is stored (not timed)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'research_main.py'), *argv, '--output_dir', output_dir,
                           '--overwrite_output_dir'], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit('the ablation run failed')


def parsed_workdir(argv):
    """The bench's --workdir, from the --cache_dir it put into the run's arguments."""
    return os.path.dirname(argv[argv.index('--cache_dir') + 1])


def stored_plan(argv):
    """(nodes per pipeline, data, settings) of the stored ablation, every stage reused from the store."""
    from research_compression_config import parse_compression_arguments, pipeline_settings, requested_pipelines
    from research_main import prepare_folds, run_chain
    from research_stages import StageStore
    args = parse_compression_arguments(argv + ['--output_dir', os.path.join(parsed_workdir(argv), 'timed')])
    pipelines = requested_pipelines(args)
    data = next(iter(prepare_folds(args).values()))
    store = StageStore.in_cache_dir(args.cache_dir)
    settings = {p: pipeline_settings(args, p, args.train_seeds[0]) for p in pipelines}
    nodes = {p: run_chain(store, p, data, settings[p], '') for p in pipelines}
    if any(not e['reused'] for e in store.events):
        raise SystemExit('some stages were not stored: the untimed ablation run did not fill the store')
    return nodes, data, settings[pipelines[0]]


def time_evaluation(nodes, data, settings, resamples):
    from research_main import evaluate_side_by_side
    timed = settings.replace(bootstrap_resamples=resamples)
    start = time.perf_counter()
    evaluate_side_by_side(nodes, data, timed)
    return time.perf_counter() - start


def time_statistics_alone(nodes, data, settings, resamples):
    """add_statistics on the predictions of one evaluation (what the resampling itself costs)."""
    import research_main
    import research_stats
    captured = {}
    real = research_main.add_statistics
    research_main.add_statistics = lambda chains, *a: captured.setdefault('chains', copy.deepcopy(chains)) and real(chains, *a)
    try:
        time_evaluation(nodes, data, settings, resamples)
    finally:
        research_main.add_statistics = real
    start = time.perf_counter()
    research_stats.add_statistics(captured['chains'], resamples, settings.seed, settings.significance_level)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--teacher_checkpoint', default=None, help='A fine-tuned teacher (skips teacher training).')
    parser.add_argument('--teacher_path', default=None, help='Or a base encoder to fine-tune.')
    parser.add_argument('--workdir', default='/tmp/bench_stats')
    parser.add_argument('--rounds', type=int, default=5, help='Pairs of timed evaluations (off/on alternating).')
    parser.add_argument('--threads', type=int, default=1, help='Intra-op threads of torch and of the latency timing.')
    parser.add_argument('--bootstrap_resamples', type=int, default=10000)
    parsed, extra = parser.parse_known_args()
    extra = [a for a in extra if a != '--']
    if not (parsed.teacher_checkpoint or parsed.teacher_path):
        parser.error('give --teacher_checkpoint or --teacher_path')
    import torch
    torch.set_num_threads(parsed.threads)
    argv = common_arguments(parsed, extra)
    fill_store(argv, os.path.join(parsed.workdir, 'ablation'))
    nodes, data, settings = stored_plan(argv)
    off, on = [], []
    for round_ in range(parsed.rounds):
        order = [0, parsed.bootstrap_resamples][::1 if round_ % 2 == 0 else -1]
        for resamples in order:
            (on if resamples else off).append(time_evaluation(nodes, data, settings, resamples))
    alone = time_statistics_alone(nodes, data, settings, parsed.bootstrap_resamples)
    stages = len({n.key for chain in nodes.values() for n in chain})
    off_m, on_m = statistics.median(off), statistics.median(on)
    print(f'\n{len(nodes)} pipelines, {stages} distinct stages, {len(data.test_idx)} test texts, '
          f'{parsed.bootstrap_resamples} resamples, {parsed.threads} thread(s), {parsed.rounds} rounds')
    print(f'evaluation without statistics: median {off_m:.2f} s  {[round(t, 2) for t in off]}')
    print(f'evaluation with statistics:    median {on_m:.2f} s  {[round(t, 2) for t in on]}')
    print(f'added: {100 * (on_m / off_m - 1):+.1f} % (goal <= +10 %); add_statistics alone {alone:.2f} s')


if __name__ == '__main__':
    main()
