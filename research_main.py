"""Entry point: runs the chosen pipeline (teacher -> KD -> prune -> quantize), or with --run_ablation all
requested pipelines as one plan of shared stages, evaluates every stage on the same test split, and
writes the results, the ablation summary and plots.

    python research_main.py --pipeline kd_prune_quant --dataset_path data.csv --author_name me ...
    python research_main.py --run_ablation --seeds 42,43,44 --dataset_path data.csv --author_name me ...
"""

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from research_compression_config import (PIPELINE_CONFIGS, parse_compression_arguments, print_compression_config,
                                         save_config)
from research_errors import UsageError

RESULTS_JSON = 'results_final.json'
RESULTS_CSV = 'results_final.csv'
CONFIG_JSON = 'config.json'
RUN_LOG = 'run.log'
TOOL_MARKER = 'research_compression'


# ---------------------------------------------------------------------------------------------
# Output folder: refuse a foreign non-empty folder, never silently overwrite an earlier run
# ---------------------------------------------------------------------------------------------

def holds_earlier_run(output_dir: str) -> bool:
    try:
        with open(os.path.join(output_dir, CONFIG_JSON), encoding='utf-8') as fh:
            return json.load(fh).get('tool') == TOOL_MARKER
    except (OSError, ValueError):
        return False


def prepare_output_dir(args) -> None:
    """Create the output folder. A non-empty folder that is not an earlier run of this tool is refused
    unless --overwrite_output_dir; an earlier run's results are moved to previous_runs/<time>/."""
    out = args.output_dir
    if os.path.isdir(out) and os.listdir(out):
        if holds_earlier_run(out):
            archive = os.path.join(out, 'previous_runs', time.strftime('%Y%m%d-%H%M%S'))
            os.makedirs(archive, exist_ok=True)
            for name in os.listdir(out):
                if name not in ('previous_runs',):
                    shutil.move(os.path.join(out, name), os.path.join(archive, name))
            print(f'[output] {out} held an earlier run: its files were moved to {archive}')
        elif not args.overwrite_output_dir:
            raise UsageError(f"--output_dir '{out}' is not empty and does not hold an earlier run of this tool. "
                             'Choose an empty or new folder, or pass --overwrite_output_dir to write into it anyway.')
    os.makedirs(out, exist_ok=True)


class TeeToLog:
    """Everything the run prints also goes to <output_dir>/run.log (progress-bar redraws excepted)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        if '\r' not in text or '\n' in text.replace('\r', ''):
            self.log.write(text.replace('\r', ''))
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):   # isatty, encoding, fileno...: the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def run_log(path: str):
    """Tee stdout and stderr into `path` (appended), restoring both afterwards."""
    saved = sys.stdout, sys.stderr
    with open(path, 'a', encoding='utf-8') as log:
        sys.stdout, sys.stderr = TeeToLog(sys.stdout, log), TeeToLog(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def write_json_atomically(path: str, payload) -> None:
    """Write aside, then rename: an interrupted run never leaves a complete-looking results file."""
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        json.dump(payload, fh, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def split_note(runs) -> str:
    parts = sorted({f'fold {r.data.fold} (test split hash {r.data.test_split_hash}, {len(r.data.test_idx)} texts)' for r in runs})
    return '; '.join(parts)


def write_pipeline_results(folder: str, args, pipeline: str, stages: List[Dict], run) -> None:
    """results_final.json / .csv of one pipeline: one entry per stage in order, the last is the final model."""
    import pandas as pd
    from research_eval import flatten_stage
    os.makedirs(folder, exist_ok=True)
    payload = {'pipeline': pipeline, 'author_name': args.author_name, 'fold': run.data.fold, 'train_seed': run.seed,
               'test_split_hash': run.data.test_split_hash, 'test_rows': int(len(run.data.test_idx)), 'stages': stages}
    rows = pd.DataFrame([flatten_stage(s, args.label_columns) for s in stages])
    rows.insert(0, 'pipeline', pipeline)
    rows.to_csv(os.path.join(folder, RESULTS_CSV + '.tmp'), index=False)
    os.replace(os.path.join(folder, RESULTS_CSV + '.tmp'), os.path.join(folder, RESULTS_CSV))
    write_json_atomically(os.path.join(folder, RESULTS_JSON), payload)


def record_run_threshold(model_dir: str, threshold: float) -> None:
    """The exported model predicts labels at this run's --threshold (the one its metrics and card use), even
    when the stage was stored by a run with another threshold (the threshold is not part of a stage's key)."""
    from research_inference import INFO_FILE, read_info, write_info
    info = read_info(model_dir)
    info['threshold'] = threshold
    os.remove(os.path.join(model_dir, INFO_FILE))   # may be a hard link into the stage store: never write through it
    write_info(model_dir, info)


def export_stage_models(folder: str, args, pipeline: str, stages: List[Dict], nodes) -> None:
    """Copy the final stage (every stage with --save_all_stages) out of the stage store into
    `folder/stages/<stage>/`, with a model card; other stages get model_dir null."""
    from research_report import write_model_card
    from research_stages import link_or_copy_tree
    for i, (stage, node) in enumerate(zip(stages, nodes)):
        if not (args.save_all_stages or i == len(stages) - 1):
            stage['model_dir'] = None
            continue
        target = os.path.join(folder, 'stages', stage['stage'])
        link_or_copy_tree(node.path, target)
        record_run_threshold(target, args.threshold)
        stage['model_dir'] = os.path.abspath(target)
        write_model_card(target, pipeline, stage, vars(args))


# ---------------------------------------------------------------------------------------------
# The plan: every (fold, seed) run of every requested pipeline, each distinct stage run once
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    fold: int
    seed: int
    data: object
    stages: Dict[str, List[Dict]]   # pipeline -> evaluated stages
    nodes: Dict[str, list]          # pipeline -> stage nodes
    events: List[Dict]


def check_methods(args, pipelines: List[str]) -> None:
    """Fail fast on a method that cannot run here, before any training."""
    from research_kd import check_kd_method
    from research_pruning import check_prune_method
    from research_quantization import check_quant_method
    configs = [PIPELINE_CONFIGS[p] for p in pipelines]
    if any(c['enable_kd'] for c in configs):
        check_kd_method(args)
    if any(c['enable_pruning'] for c in configs):
        check_prune_method(args.prune_method)
    if any(c['enable_quantization'] for c in configs):
        check_quant_method(args.quant_method, args.quant_dtype)


def run_plan(args, pipelines: List[str]) -> List[Run]:
    from research_data import prepare_data
    from research_eval import add_relative_metrics
    from research_stages import StageRunner, StageStore
    store = StageStore(os.path.join(args.cache_dir, 'stages'))
    folds = list(range(args.num_folds)) if args.run_full_kfold else [args.eval_fold]
    runs = []
    for fold in folds:
        data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, fold,
                            args.data_fraction, args.val_fraction, args.seed)
        for seed in args.seeds:
            args.train_seed = seed
            runner = StageRunner(args, data, store)
            runner.plan(pipelines)
            label = f'fold {fold + 1}/{len(folds)}, seed {seed}' if len(folds) * len(args.seeds) > 1 else ''
            nodes = {p: runner.run_pipeline(p, label) for p in pipelines}
            # Measure after every stage exists, all in this process, so latencies compare side by side.
            stages = {p: add_relative_metrics([runner.evaluate(n) for n in ns]) for p, ns in nodes.items()}
            runs.append(Run(fold, seed, data, stages, nodes, runner.events))
    return runs


def write_outputs(args, pipelines: List[str], runs: List[Run]) -> None:
    from research_report import final_stage_row, summarize_runs, write_plots, write_summary
    single = len(runs) == 1 and not args.run_ablation
    rows = []
    for run in runs:
        run_dir = args.output_dir if len(runs) == 1 else os.path.join(args.output_dir, 'runs', f'fold{run.fold}_seed{run.seed}')
        for pipeline in pipelines:
            folder = run_dir if single else os.path.join(run_dir, 'pipelines', pipeline)
            stages = run.stages[pipeline]
            export_stage_models(folder, args, pipeline, stages, run.nodes[pipeline])
            write_pipeline_results(folder, args, pipeline, stages, run)
            rows.append(final_stage_row(pipeline, stages, args.label_columns, f'fold{run.fold}_seed{run.seed}'))
    log = [{'fold': r.fold, 'seed': r.seed, **e} for r in runs for e in r.events]
    write_json_atomically(os.path.join(args.output_dir, 'stage_log.json'), log)
    if single:
        return
    summary = summarize_runs(rows)
    write_summary(summary, args.output_dir, args.label_columns, split_note(runs))
    write_plots(summary, args.output_dir, args.label_columns)
    print('\n' + open(os.path.join(args.output_dir, 'ablation_summary.md'), encoding='utf-8').read())


def check_dataset(args) -> None:
    from research_data import load_labeled_csv
    load_labeled_csv(args.dataset_path, args.text_column, args.label_columns)


def run_and_report(args, pipelines: List[str]) -> None:
    # Configuration, printed and saved before any long work
    print_compression_config(args, pipelines)
    save_config(args, os.path.join(args.output_dir, CONFIG_JSON), pipelines)
    started = time.time()

    # Stages (shared between pipelines, reused from the stage store), then evaluation of each
    runs = run_plan(args, pipelines)

    # Results, ablation summary and plots
    write_outputs(args, pipelines, runs)
    from research_eval import format_stage_table
    if len(runs) == 1 and not args.run_ablation:
        print('\n' + format_stage_table(runs[0].stages[args.pipeline]))
    trained = sum(1 for r in runs for e in r.events if not e['reused'])
    print(f'\n[done] {", ".join(pipelines)} in {time.time() - started:.0f} s ({trained} stage(s) run, the rest '
          f'reused); results in {args.output_dir}')


def main(args_list: Optional[List[str]] = None) -> int:
    try:
        # Arguments, output folder, configuration (printed and saved before any long work)
        args = parse_compression_arguments(args_list)
        args.tool = TOOL_MARKER
        pipelines = args.ablation_pipelines if args.run_ablation else [args.pipeline]
        # Bad methods and bad data are refused before an earlier run in --output_dir is archived.
        check_methods(args, pipelines)
        check_dataset(args)
        prepare_output_dir(args)
        with run_log(os.path.join(args.output_dir, RUN_LOG)):
            run_and_report(args, pipelines)
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(main())
