"""What a budgeted search (research_search) writes: search_trials.csv (a row per trial of the study),
search_pareto.md and search_pareto.png (validation macro-F1 against size and against speed-up, budget lines,
the feasible Pareto front), and search_best/: the best feasible trial's final model with its model card and its
test-split metrics, measured once, beside the teacher's. The printed summary compares it with the best feasible
of the eight pipelines run with the command line's settings.

The intervals are percentile bootstraps of macro-F1 over the rows of a split (`bootstrap_interval`).
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from research_compression_config import STAGES
from research_data import tokenized_splits
from research_eval import add_relative_metrics, evaluate_stage, measure_side_by_side, predict_probabilities
from research_files import fresh_folder_inside, temporary_path, write_json_atomically
from research_inference import load_compressed_model, set_threshold
from research_cards import write_model_card
from research_plots import pareto_front
from research_search_space import SEARCH_SETTINGS, trial_settings
from research_stages import copy_stage
from research_stats import percentile_interval, resample_counts, resampled_f1_metrics

TRIALS_CSV = 'search_trials.csv'
PARETO_MD = 'search_pareto.md'
PARETO_PNG = 'search_pareto.png'
BEST_DIR = 'search_best'
BEST_JSON = 'search_result.json'
SEARCH_OUTPUTS = (TRIALS_CSV, PARETO_MD, PARETO_PNG, BEST_DIR)
BOOTSTRAP_ROUNDS = 1000


def bootstrap_interval(labels: np.ndarray, predictions: np.ndarray, seed: int = 0,
                       rounds: int = BOOTSTRAP_ROUNDS) -> Tuple[float, float]:
    """95 % percentile bootstrap interval of macro-F1 over the rows of a split, computed as every interval of
    the tool is (research_stats: seeded resamples, counts scored in one matrix product)."""
    counts = resample_counts(len(labels), rounds, seed)
    low, high = percentile_interval(resampled_f1_metrics(labels, predictions, counts)['f1_macro'])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# The trials as a table
# ---------------------------------------------------------------------------------------------

def trial_row(trial) -> Dict:
    attrs = trial.user_attrs
    chosen = attrs.get('chosen') or trial.params
    owner = attrs.get('owner') or {}
    row = {'trial': trial.number, 'state': trial.state.name, 'pipeline': attrs.get('pipeline'),
           'description': attrs.get('description'), 'corner': attrs.get('corner'), 'anchor': attrs.get('anchor'),
           'retry_of': attrs.get('retry_of')}
    row.update({name: chosen.get(name) for name in SEARCH_SETTINGS})
    row.update({k: attrs.get(k) for k in ('val_f1_macro', 'val_f1_low', 'val_f1_high', 'size_mb', 'speedup',
                                         'speedup_iqr', 'latency_ms_p50', 'latency_noisy', 'feasible')})
    row.update({k: ';'.join(attrs.get(k) or []) for k in ('stage_keys', 'reused', 'produced')})
    row.update({'host': owner.get('host'), 'pid': owner.get('pid'), 'note': attrs.get('note'),
                'duration_s': trial.duration.total_seconds() if trial.duration else None})
    return row


def trials_frame(study) -> pd.DataFrame:
    return pd.DataFrame([trial_row(t) for t in study.get_trials(deepcopy=False)])


def measured_trials(frame: pd.DataFrame) -> pd.DataFrame:
    done = frame[(frame['state'] == 'COMPLETE') & frame['val_f1_macro'].notna()].copy()
    done['feasible'] = done['feasible'].astype(bool)
    return done


def feasible_front(done: pd.DataFrame, cost: str) -> List[int]:
    """Trial numbers on the Pareto front of the feasible trials (lower cost, higher validation macro-F1);
    for the speed-up, higher is better, so its negative is the cost."""
    feasible = done[done['feasible']]
    if feasible.empty:
        return []
    values = feasible[cost].to_numpy(float)
    front = pareto_front(-values if cost == 'speedup' else values, feasible['val_f1_macro'].to_numpy(float))
    return [int(feasible['trial'].iloc[i]) for i in front]


# ---------------------------------------------------------------------------------------------
# search_pareto.md and search_pareto.png
# ---------------------------------------------------------------------------------------------

def budget_text(args) -> str:
    parts = [f'size <= {args.budget_size_mb:g} MB' if args.budget_size_mb is not None else None,
             f'speed-up >= {args.budget_speedup:g}x' if args.budget_speedup is not None else None,
             f'p50 <= {args.budget_latency_ms:g} ms' if args.budget_latency_ms is not None else None]
    return ', '.join(p for p in parts if p) or 'none'


def pareto_markdown(done: pd.DataFrame, args, summary: Sequence[str]) -> str:
    on_size, on_speed = set(feasible_front(done, 'size_mb')), set(feasible_front(done, 'speedup'))
    lines = [f'# Budgeted search: {args.search_name}', '', f'Budget: {budget_text(args)}. Trials are scored on the '
             'validation split (macro-F1, 95 % bootstrap interval); only search_best/ is scored on the test split.', '',
             *summary, '', '| trial | settings | val macro-F1 | size MB | speed-up | feasible | Pareto (size / speed) |',
             '|---|---|---|---|---|---|---|']
    for _, r in done.sort_values('val_f1_macro', ascending=False).iterrows():
        front = '/'.join(m for m, on in (('size', r['trial'] in on_size), ('speed', r['trial'] in on_speed)) if on)
        lines.append(f'| {r["trial"]} | {r["description"]} | {r["val_f1_macro"]:.4f} [{r["val_f1_low"]:.3f}, '
                     f'{r["val_f1_high"]:.3f}] | {r["size_mb"]:.2f} | {r["speedup"]:.2f}x | '
                     f'{"yes" if r["feasible"] else "no"} | {front or "-"} |')
    return '\n'.join(lines) + '\n'


def plot_search(done: pd.DataFrame, args, path: str, best: Optional[int]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = (('size_mb', 'size on disk (MB)', args.budget_size_mb), ('speedup', 'speed-up over the teacher (x)',
                                                                       args.budget_speedup))
    for ax, (cost, label, limit) in zip(axes, panels):
        for feasible, colour, name in ((True, 'tab:green', 'feasible'), (False, 'tab:gray', 'over budget')):
            part = done[done['feasible'] == feasible]
            y = part['val_f1_macro'].to_numpy(float)
            err = np.vstack([y - part['val_f1_low'].to_numpy(float), part['val_f1_high'].to_numpy(float) - y])
            ax.errorbar(part[cost], y, yerr=err if len(part) else None, fmt='o', color=colour, ecolor='lightgray',
                        capsize=2, label=name)
        front = done.set_index('trial').loc[feasible_front(done, cost)].sort_values(cost)
        if len(front):
            ax.plot(front[cost], front['val_f1_macro'], '--', color='tab:red', label='feasible Pareto front')
        if best is not None:
            row = done.set_index('trial').loc[best]
            ax.scatter([row[cost]], [row['val_f1_macro']], marker='*', s=220, color='gold', edgecolors='black',
                       zorder=5, label=f'best feasible (trial #{best})')
        if limit is not None:
            ax.axvline(limit, color='tab:red', alpha=0.6, linestyle=':', label='budget')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('macro-F1 (validation)')
    axes[1].legend(loc='best', fontsize=8)
    fig.suptitle(f'{args.search_name}: {len(done)} trials, budget {budget_text(args)}', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# search_best/: the best feasible trial, scored on the test split once, beside the teacher
# ---------------------------------------------------------------------------------------------

def test_quality_interval(node, data, settings) -> Dict:
    classifier = load_compressed_model(node.path)
    test = tokenized_splits(data, classifier.tokenizer, settings.max_length, settings.cache_dir).test
    labels, probs = predict_probabilities(classifier, test)
    low, high = bootstrap_interval(labels, probs >= settings.threshold, seed=settings.seed)
    return {'f1_macro_low': low, 'f1_macro_high': high}


def test_metrics_beside_teacher(nodes, data, settings) -> List[Dict]:
    """[teacher, final] measured the way a run measures its stages: quality on the test split (with a
    bootstrap interval), size, then latency side by side; ratios against the teacher."""
    chain = [nodes[0], nodes[-1]] if len(nodes) > 1 else [nodes[0]]
    results = []
    for node in chain:
        result = {'stage': STAGES[node.kind].name, 'stage_key': node.key,
                  **evaluate_stage(node.path, node.meta['linear_roles'], node.meta.get('prune_layers') or
                                   settings.prune_layers, data, settings, node.key),
                  **node.meta.get('report', {}), **test_quality_interval(node, data, settings)}
        results.append(result)
    group = {n.key: n.path for n in chain}
    parents = {nodes[-1].key: nodes[-2].path} if len(nodes) > 1 else {}
    for result, (key, latency) in zip(results, measure_side_by_side(group, nodes[0].key, data, settings, parents).items()):
        result.update(latency)
    return add_relative_metrics(results)


def export_best(trial, ctx) -> Dict:
    """Produce (from the store: normally all reused) the best trial's stages, measure its final stage and the
    teacher on the test split, export the final stage to search_best/ with its model card."""
    args = ctx.args
    chosen = trial.user_attrs['chosen']
    settings = trial_settings(args, chosen)
    ctx.store.plan(key for _, key in ctx.stage_keys(trial.user_attrs['pipeline'], ctx.data, settings)
                   if key not in ctx.store.nodes)
    nodes = ctx.run_chain(ctx.store, trial.user_attrs['pipeline'], ctx.data, settings, f', best trial {trial.number}')
    measured = test_metrics_beside_teacher(nodes, ctx.data, settings)
    teacher, best = measured[0], measured[-1]
    target = os.path.join(args.output_dir, BEST_DIR)
    for note in fresh_folder_inside(args.output_dir, target):
        print(f'[output] {note}')
    copy_stage(nodes[-1], target)
    set_threshold(target, args.threshold)
    best['model_dir'] = os.path.abspath(target)
    write_model_card(target, trial.user_attrs['pipeline'], best, settings.as_dict())
    record = {'trial': trial.number, 'pipeline': trial.user_attrs['pipeline'], 'settings': chosen,
              'description': trial.user_attrs['description'], 'budget': budget_text(args),
              'validation': {k: trial.user_attrs[k] for k in ('val_f1_macro', 'val_f1_low', 'val_f1_high', 'size_mb',
                                                               'speedup', 'latency_ms_p50')},
              'test': {'teacher': teacher, 'best': best}, 'test_split_hash': ctx.data.test_split_hash}
    write_json_atomically(os.path.join(target, BEST_JSON), record)
    return record


# ---------------------------------------------------------------------------------------------
# All outputs and the summary
# ---------------------------------------------------------------------------------------------

def summary_lines(done: pd.DataFrame, best_record: Optional[Dict]) -> List[str]:
    feasible = done[done['feasible']]
    if best_record is None:
        return ['No trial met the budget.']
    b, t = best_record['test']['best'], best_record['test']['teacher']
    lines = [f'Best feasible: trial #{best_record["trial"]} ({best_record["description"]}): val macro-F1 '
             f'{best_record["validation"]["val_f1_macro"]:.4f}; on the test split (measured once) macro-F1 '
             f'{b["f1_macro"]:.4f} [{b["f1_macro_low"]:.3f}, {b["f1_macro_high"]:.3f}], {b["size_mb"]:.2f} MB, '
             f'{b["speedup"]:.1f}x, beside the teacher\'s {t["f1_macro"]:.4f} [{t["f1_macro_low"]:.3f}, '
             f'{t["f1_macro_high"]:.3f}], {t["size_mb"]:.2f} MB. Exported to {BEST_DIR}/.']
    corners = feasible[feasible['corner'].notna()]
    if corners.empty:
        lines.append('None of the eight pipelines with the command line\'s settings met the budget.')
    else:
        top = corners.sort_values('val_f1_macro', ascending=False).iloc[0]
        gain = best_record['validation']['val_f1_macro'] - top['val_f1_macro']
        lines.append(f'Best feasible of the eight pipelines with the command line\'s settings: {top["corner"]} '
                     f'(trial #{top["trial"]}), val macro-F1 {top["val_f1_macro"]:.4f}: the search gains {gain:+.4f}.')
    return lines


def nearest_lines(done: pd.DataFrame, args, count: int = 3) -> List[str]:
    """The trials closest to the budget (sum of the relative overshoots), for a search where none met it."""
    def overshoot(r):
        return sum(max(0.0, v) for v in (
            r['size_mb'] / args.budget_size_mb - 1 if args.budget_size_mb else 0,
            args.budget_speedup / max(r['speedup'], 1e-9) - 1 if args.budget_speedup else 0,
            r['latency_ms_p50'] / args.budget_latency_ms - 1 if args.budget_latency_ms else 0))
    ranked = done.assign(overshoot=done.apply(overshoot, axis=1)).sort_values(['overshoot', 'val_f1_macro'],
                                                                               ascending=[True, False])
    return [f'  trial #{r["trial"]}: {r["description"]}: val macro-F1 {r["val_f1_macro"]:.4f}, {r["size_mb"]:.2f} MB, '
            f'{r["speedup"]:.1f}x ({r["overshoot"]:.0%} over budget)' for _, r in ranked.head(count).iterrows()]


def write_search_outputs(study, ctx) -> Optional[Dict]:
    """search_trials.csv, search_best/ (when a trial met the budget), search_pareto.md and .png; prints the
    summary; returns search_best's record (None when no trial met the budget)."""
    args = ctx.args
    frame = trials_frame(study)
    tmp = temporary_path(os.path.join(args.output_dir, TRIALS_CSV))
    frame.to_csv(tmp, index=False)
    os.replace(tmp, os.path.join(args.output_dir, TRIALS_CSV))
    done = measured_trials(frame) if len(frame) else frame
    best_trial = None
    if len(done) and done['feasible'].any():
        number = int(done[done['feasible']].sort_values(['val_f1_macro', 'size_mb'], ascending=[False, True])['trial'].iloc[0])
        best_trial = study.trials[number]
    record = export_best(best_trial, ctx) if best_trial is not None else None
    summary = summary_lines(done, record) if len(done) else ['No trial finished.']
    with open(os.path.join(args.output_dir, PARETO_MD), 'w', encoding='utf-8') as fh:
        fh.write(pareto_markdown(done, args, summary) if len(done) else '# Budgeted search\n\nNo trial finished.\n')
    if len(done):
        plot_search(done, args, os.path.join(args.output_dir, PARETO_PNG), best_trial.number if best_trial else None)
    print()
    for line in summary:
        print(f'[search] {line}')
    if record is None and len(done):
        print(f'[search] no trial met the budget ({budget_text(args)}); the nearest:')
        print('\n'.join(nearest_lines(done, args)))
    return record
