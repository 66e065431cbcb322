"""The plots of a run and of a sweep: macro-F1 against size and latency with the Pareto front, per-label F1, and
macro-F1 against a swept setting. matplotlib is imported when a plot is drawn (a run that draws none never
loads it).
"""

import os
from typing import List, Sequence

import numpy as np
import pandas as pd


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower cost and higher quality), by cost."""
    order = np.lexsort((-quality, cost))
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return np.asarray(front, dtype=int)


def plot_quality_vs_cost(summary: pd.DataFrame, cost: str, xlabel: str, path: str, log_x: bool = False) -> None:
    plt = pyplot()
    x, y = summary[cost].to_numpy(float), summary['f1_macro'].to_numpy(float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xerr = summary.get(f'{cost}_std')
    yerr = summary.get('f1_macro_std')
    ax.errorbar(x, y, xerr=None if xerr is None else xerr.to_numpy(float), yerr=None if yerr is None else yerr.to_numpy(float),
                fmt='o', color='tab:blue', ecolor='lightgray', capsize=2)
    for xi, yi, name in zip(x, y, summary['pipeline']):
        ax.annotate(name, (xi, yi), textcoords='offset points', xytext=(4, 4), fontsize=8)
    front = pareto_front(x, y)
    ax.plot(x[front], y[front], '--', color='tab:red', label='Pareto front')
    ax.scatter(x[front], y[front], s=90, facecolors='none', edgecolors='tab:red')
    if log_x:
        ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('macro-F1 (test)')
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.1)  # room for the pipeline names next to the outermost points
    ax.legend(loc='best')
    save_figure(fig, path)


def plot_per_label_f1(summary: pd.DataFrame, label_names: Sequence[str], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(summary)), 4.4))
    width = 0.8 / len(label_names)
    positions = np.arange(len(summary))
    for j, label in enumerate(label_names):
        ax.bar(positions + j * width, summary[f'f1_{label}'], width, label=label)
    ax.set_xticks(positions + width * (len(label_names) - 1) / 2)
    ax.set_xticklabels(summary['pipeline'], rotation=30, ha='right')
    ax.set_ylabel('F1 (test)')
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(label_names), fontsize=8, loc='upper center', bbox_to_anchor=(0.5, 1.12))
    ax.grid(axis='y', alpha=0.3)
    save_figure(fig, path)


def write_plots(summary: pd.DataFrame, output_dir: str, label_names: Sequence[str]) -> List[str]:
    paths = [os.path.join(output_dir, name) for name in ('f1_vs_size.png', 'f1_vs_latency.png', 'per_label_f1.png')]
    plot_quality_vs_cost(summary, 'size_mb', 'size on disk (MB)', paths[0])
    plot_quality_vs_cost(summary, 'latency_ms_p50', 'CPU latency p50 (ms)', paths[1])
    plot_per_label_f1(summary, label_names, paths[2])
    return paths


def plot_sweep(frame: pd.DataFrame, parameter: str, path: str) -> None:
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
