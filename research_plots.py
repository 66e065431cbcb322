"""The plots of an ablation summary (one row per pipeline): macro-F1 against size and latency with 95 %
interval error bars, the teacher as a reference line, a Pareto front through the pipelines that are not
significantly worse than the teacher, and per-label F1 bars. Read from the summary table only
(research_report.summarize_runs); matplotlib with the Agg backend, imported when a plot is drawn.

What makes them readable: names placed where they overlap neither another name nor a point, a bar of F1 0
drawn as a visible stub with "0" on it, and a log size/latency axis where the values span LOG_AXIS_RATIO or more.
"""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

LOG_AXIS_RATIO = 40           # largest / smallest cost at which the cost axis turns logarithmic
ZERO_BAR = 0.012              # height of the stub that shows a bar of F1 exactly 0
LABEL_OFFSETS = [(8, 8), (8, -8), (-8, 8), (-8, -8), (14, 20), (-14, 20), (14, -20), (-14, -20),
                 (20, 32), (-20, 32), (20, -32), (-20, -32)]   # points from the marker, nearest first


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower cost and higher quality), by cost."""
    order = np.lexsort((-quality, cost))
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return np.asarray(front, dtype=int)


def quality_interval(summary: pd.DataFrame, metric: str = 'f1_macro') -> Tuple[np.ndarray, np.ndarray]:
    """Per row the 95 % interval of `metric`: the t interval of the mean over several runs, else the
    bootstrap interval of the single run (NaN where there is none)."""
    def column(name):
        return summary[name].to_numpy(float) if name in summary else np.full(len(summary), np.nan)
    several = column('runs') > 1
    low = np.where(several, column(f'{metric}_mean_ci_low'), column(f'{metric}_ci_low'))
    high = np.where(several, column(f'{metric}_mean_ci_high'), column(f'{metric}_ci_high'))
    return np.clip(low, 0, 1), np.clip(high, 0, 1)   # a t interval of two runs can pass the bounds of an F1


def significantly_worse(summary: pd.DataFrame) -> np.ndarray:
    """Rows whose macro-F1 is below the teacher's and significantly different from it (in every run)."""
    runs = summary['runs'].to_numpy(float) if 'runs' in summary else np.ones(len(summary))
    if 'significant_runs' in summary:
        significant = summary['significant_runs'].to_numpy(float) >= runs
    elif 'significant_vs_baseline' in summary:
        significant = summary['significant_vs_baseline'].to_numpy(float) >= 1
    else:
        significant = np.zeros(len(summary), dtype=bool)
    below = summary['delta_f1_macro'].to_numpy(float) < 0 if 'delta_f1_macro' in summary else np.zeros(len(summary), bool)
    return np.nan_to_num(significant, nan=0).astype(bool) & below


def place_labels(ax, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> None:
    """Annotate each point with its name at the nearest offset whose text box overlaps no earlier name and no
    other point; where none is clear, at the offset with the fewest overlaps, names first (greedy, in display
    coordinates: call after the layout is final)."""
    renderer = ax.figure.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([x, y]))
    taken = []
    for i, name in enumerate(names):
        best = None
        for dx, dy in LABEL_OFFSETS:
            # a thin leader line keeps a name moved away from its point attached to it
            text = ax.annotate(name, (x[i], y[i]), textcoords='offset points', xytext=(dx, dy), fontsize=8,
                               ha='left' if dx > 0 else 'right', va='center',
                               arrowprops=dict(arrowstyle='-', color='gray', lw=0.5, shrinkA=0, shrinkB=3))
            box = text.get_window_extent(renderer).padded(2)
            padded = box.padded(5)                          # a marker is about 5 px in radius
            clashes = (sum(box.overlaps(t) for t in taken),
                       sum(padded.contains(px, py) for j, (px, py) in enumerate(points) if j != i))
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == (0, 0):
                break
        taken.append(best[2])


def draw_teacher_reference(ax, summary: pd.DataFrame) -> None:
    """The teacher's macro-F1 as a horizontal line, with its interval as a band."""
    if 'baseline_f1_macro' not in summary or summary['baseline_f1_macro'].isna().all():
        return
    level = float(summary['baseline_f1_macro'].mean())
    ax.axhline(level, color='dimgray', linestyle=':', linewidth=1.2, label=f'teacher {level:.3f}')
    low, high = (summary.get(f'baseline_f1_macro_ci_{side}') for side in ('low', 'high'))
    if low is not None and high is not None and np.isfinite(low.mean()) and np.isfinite(high.mean()):
        ax.axhspan(float(low.mean()), float(high.mean()), color='gray', alpha=0.12, label='teacher 95 % interval')


def plot_quality_vs_cost(summary: pd.DataFrame, cost: str, xlabel: str, path: str, log_x: Optional[bool] = None) -> None:
    """Macro-F1 against `cost` with 95 % interval error bars; the Pareto front runs only through the pipelines
    that are not significantly worse than the teacher (those are drawn hollow and grey); a log cost axis when
    `log_x`, or by default when the costs span LOG_AXIS_RATIO or more."""
    plt = pyplot()
    x, y = summary[cost].to_numpy(float), summary['f1_macro'].to_numpy(float)
    low, high = quality_interval(summary)
    yerr = np.vstack([np.nan_to_num(y - low), np.nan_to_num(high - y)])
    xerr = summary[f'{cost}_std'].to_numpy(float) if f'{cost}_std' in summary else None
    worse = significantly_worse(summary)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    draw_teacher_reference(ax, summary)
    for mask, style in ((~worse, dict(fmt='o', color='tab:blue', label='pipeline (95 % interval)')),
                        (worse, dict(fmt='o', color='gray', mfc='white', label='significantly worse than the teacher'))):
        if mask.any():
            ax.errorbar(x[mask], y[mask], yerr=yerr[:, mask], xerr=None if xerr is None else xerr[mask],
                        ecolor='silver', capsize=3, **style)
    candidates = np.flatnonzero(~worse & np.isfinite(x) & np.isfinite(y))
    if len(candidates):
        front = candidates[pareto_front(x[candidates], y[candidates])]
        ax.plot(x[front], y[front], '--', color='tab:red', label='Pareto front (not significantly worse)')
        ax.scatter(x[front], y[front], s=110, facecolors='none', edgecolors='tab:red')
    finite = x[np.isfinite(x) & (x > 0)]
    if log_x or (log_x is None and len(finite) and finite.max() / finite.min() >= LOG_AXIS_RATIO):
        ax.set_xscale('log')
        xlabel += ' (log scale)'
    ax.set_xlabel(xlabel)
    ax.set_ylabel('macro-F1 (test)')
    ax.grid(alpha=0.3)
    ax.margins(x=0.18, y=0.12)   # room for the names next to the outermost points
    ax.legend(loc='best', fontsize=7)
    fig.tight_layout()      # before the names are placed: a later layout change would move the points under them
    fig.canvas.draw()
    place_labels(ax, x, y, list(summary['pipeline']))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_label_f1(summary: pd.DataFrame, label_names: Sequence[str], path: str) -> None:
    """Per-label F1 of every pipeline's final stage, grouped by pipeline, with 95 % interval error bars where the
    summary has them; a bar of exactly 0 is drawn as a hatched stub marked "0" so it is not mistaken for a
    missing bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.2, 1.3 * len(summary)), 4.8))
    width = 0.8 / len(label_names)
    positions = np.arange(len(summary))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    handles = []
    for j, label in enumerate(label_names):
        values = summary[f'f1_{label}'].to_numpy(float)
        where = positions + j * width
        color = colors[j % len(colors)]
        bars = ax.bar(where, np.where(values == 0, ZERO_BAR, values), width, color=color)
        handles.append(plt.Rectangle((0, 0), 1, 1, color=color, label=label))   # unhatched, whatever bar 0 is
        low, high = quality_interval(summary, f'f1_{label}')
        if np.isfinite(low).any():
            ax.errorbar(where, values, yerr=np.vstack([np.nan_to_num(values - low), np.nan_to_num(high - values)]),
                        fmt='none', ecolor='black', elinewidth=0.7, capsize=1.5)
        for bar, value, top in zip(bars, values, np.nan_to_num(high, nan=0.0)):
            if value == 0:   # a hatched stub, with "0" above it and its error bar
                bar.set_hatch('////')
                bar.set_edgecolor('black')
                ax.text(bar.get_x() + bar.get_width() / 2, max(top, ZERO_BAR) + 0.012, '0', ha='center', fontsize=7)
    ax.set_xticks(positions + width * (len(label_names) - 1) / 2)
    ax.set_xticklabels(summary['pipeline'], rotation=30, ha='right')
    ax.set_ylabel('F1 (test)')
    ax.set_ylim(0, 1.05)
    ax.legend(handles=handles, ncol=len(label_names), fontsize=8, loc='upper center', bbox_to_anchor=(0.5, 1.13))
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(summary: pd.DataFrame, output_dir: str, label_names: Sequence[str]) -> List[str]:
    paths = [os.path.join(output_dir, name) for name in ('f1_vs_size.png', 'f1_vs_latency.png', 'per_label_f1.png')]
    plot_quality_vs_cost(summary, 'size_mb', 'size on disk (MB)', paths[0])
    plot_quality_vs_cost(summary, 'latency_ms_p50', 'CPU latency p50 (ms)', paths[1])
    plot_per_label_f1(summary, label_names, paths[2])
    return paths


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_sweep(frame: pd.DataFrame, parameter: str, path: str) -> None:
    """Macro-F1 of every pipeline against a swept setting (research_report)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for pipeline, group in frame.groupby('pipeline', sort=False):
        group = group.sort_values(parameter)
        ax.plot(group[parameter], group['f1_macro'], 'o-', label=pipeline)
    ax.set_xlabel(parameter)
    ax.set_ylabel('macro-F1 (test)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
