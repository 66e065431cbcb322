"""Wall time of the full eight-pipeline ablation against a single kd_prune_quant run with the same
settings, in one invocation, each from an empty stage cache (goal: ratio <= 2).

    python bench/bench_ablation.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \
        --teacher_checkpoint /path/to/fine-tuned/teacher --workdir /tmp/bench_ablation

Both runs load the same fine-tuned teacher checkpoint (so teacher fine-tuning, which both would share
equally, does not dilute the ratio) and derive a 3-layer student from it. Prints the ratio, the stage
counts and the ablation summary table; copies the plots to --plots_dir.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(extra, output_dir, cache_dir, common):
    argv = [sys.executable, os.path.join(ROOT, 'research_main.py'), *common, '--output_dir', output_dir,
            '--cache_dir', cache_dir, *extra]
    import resource
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f'run failed: {" ".join(extra)}')
    # CPU time (user + system) is less sensitive than wall time to other jobs sharing the cores.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return elapsed, cpu


def stages_run(output_dir):
    with open(os.path.join(output_dir, 'stage_log.json'), encoding='utf-8') as fh:
        return sum(1 for e in json.load(fh) if not e['reused'])


def check_every_stage_loads(ablation_out):
    """Every saved stage folder of every pipeline loads with load_compressed_model and predicts."""
    sys.path.insert(0, ROOT)
    from research_inference import load_compressed_model
    checked = 0
    for pipeline in sorted(os.listdir(os.path.join(ablation_out, 'pipelines'))):
        with open(os.path.join(ablation_out, 'pipelines', pipeline, 'results_final.json'), encoding='utf-8') as fh:
            for stage in json.load(fh)['stages']:
                prediction = load_compressed_model(stage['model_dir']).predict(['তুই একটা বেয়াদব'])[0]
                assert len(prediction) == 5
                checked += 1
    print(f'{checked} saved stage folders loaded with load_compressed_model and predicted')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--teacher_checkpoint', required=True)
    parser.add_argument('--workdir', default='/tmp/bench_ablation')
    parser.add_argument('--plots_dir', default=os.path.join(ROOT, 'bench', 'ablation_plots'))
    parser.add_argument('--data_fraction', default='0.4')
    parser.add_argument('--epochs', default='2')
    parser.add_argument('--fine_tune_epochs', default='1')
    parsed = parser.parse_args()
    shutil.rmtree(parsed.workdir, ignore_errors=True)
    common = ['--dataset_path', parsed.dataset_path, '--author_name', 'bench', '--teacher_checkpoint',
              parsed.teacher_checkpoint, '--student_layers', '3', '--data_fraction', parsed.data_fraction,
              '--num_folds', '5', '--eval_fold', '0', '--seed', '42', '--max_length', '64', '--batch', '32',
              '--lr', '1e-4', '--epochs', parsed.epochs, '--fine_tune_epochs', parsed.fine_tune_epochs,
              '--early_stopping_patience', '2', '--latency_runs', '30']
    single_out, ablation_out = (os.path.join(parsed.workdir, n) for n in ('single', 'ablation'))
    single = run_main(['--pipeline', 'kd_prune_quant'], single_out, os.path.join(parsed.workdir, 'cache_single'), common)
    ablation = run_main(['--run_ablation', '--save_all_stages'], ablation_out, os.path.join(parsed.workdir, 'cache_ablation'), common)
    print(f'single kd_prune_quant: {single[0]:.0f} s wall, {single[1]:.0f} s CPU, {stages_run(single_out)} stages run')
    print(f'eight-pipeline ablation: {ablation[0]:.0f} s wall, {ablation[1]:.0f} s CPU, {stages_run(ablation_out)} stages run')
    print(f'wall-time ratio ablation / single: {ablation[0] / single[0]:.2f}  (goal <= 2); '
          f'CPU-time ratio: {ablation[1] / single[1]:.2f}')
    print()
    print(open(os.path.join(ablation_out, 'ablation_summary.md'), encoding='utf-8').read())
    check_every_stage_loads(ablation_out)
    os.makedirs(parsed.plots_dir, exist_ok=True)
    for name in ('f1_vs_size.png', 'f1_vs_latency.png', 'per_label_f1.png'):
        shutil.copy(os.path.join(ablation_out, name), os.path.join(parsed.plots_dir, name))
    print(f'plots copied to {parsed.plots_dir}')


if __name__ == '__main__':
    main()
