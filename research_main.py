"""Entry point: the story of a run. Parse and validate everything -> split the data of every fold (labels a
split cannot score are refused) -> prepare the output folder -> for each fold and training seed, run each
pipeline's chain of stages (teacher -> KD -> prune -> quantize) through the stage store, then evaluate every
stage side by side -> write results, exported models, summary and plots.

    python research_main.py --pipeline kd_prune_quant --dataset_path data.csv --author_name me ...
    python research_main.py --run_ablation --seeds 42,43,44 --dataset_path data.csv --author_name me ...
    python research_main.py --cache_report --cache_dir ./cache
    torchrun --standalone --nproc_per_node 2 research_main.py --pipeline kd_prune_quant ...   # data-parallel

Under torchrun / accelerate launch every process runs the same plan: the main process (rank 0) alone prepares
the output folder, decides from the stage store what must be produced, writes and measures; a stage that
trains is trained by all processes together (the Trainer's DDP), one that does not by the main process
while the others wait; then all continue from the main process's stored stage.
"""

import sys

from research_settings import exit_if_help

if __name__ == '__main__':
    exit_if_help(sys.argv[1:])   # --help before torch and transformers load (they take seconds to import)

import contextlib   # (the imports below come after the --help shortcut on purpose)
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from transformers import set_seed
from transformers.utils import logging as transformers_logging

from research_cache_upkeep import cache_report, prune_cache
from research_compression_config import (PIPELINE_CONFIGS, STAGES, parse_compression_arguments, pipeline_settings,
                                         print_compression_config, requested_pipelines, save_config, stage_identity,
                                         store_maintenance)
from research_data import check_optimizer_steps, prepare_data
from research_distributed import (all_processes, broadcast, finish, is_distributed, is_main_process, main_process_first,
                                  start)
from research_errors import UsageError
from research_eval import add_relative_metrics, evaluate_stage, measure_side_by_side, peak_memory_of_stages
from research_faults import fault_exit_code, faults_reported, install_signal_handlers
from research_files import remove_abandoned_temporaries, write_json_atomically
from research_output_guard import hold_output_folder, release_output_folder
from research_output import CONFIG_JSON, RUN_LOG, STAGE_LOG, captured_output, prepare_output_dir, run_log, show_progress_bars
from research_plots import write_plots
from research_search import run_search
from research_results import (compact_summary, export_stage_models, final_stage_row, format_stage_table, summarize_runs,
                              write_pipeline_results, write_summary)
from research_stage_locks import release_stage_uses
from research_stages import WORK_DIR, StageNode, StageStore, stage_key
from research_tokenizer_fit import report_tokenizer_fit, tokenizer_roles
from research_stats import add_statistics
from research_training import resumable_checkpoint


@dataclass
class Run:
    """One (fold, training seed) of the plan: the data, and per pipeline its stage nodes and evaluations."""
    fold: int
    seed: int
    data: object
    nodes: Dict[str, List[StageNode]]
    stages: Dict[str, List[Dict]]
    tokenizer_fit: Optional[Dict] = None


def stage_keys(pipeline: str, data, settings) -> List[tuple]:
    """(kind, key) of every stage of a pipeline: each key hashes its settings, its parent's key and the data."""
    keys, parent = [], ''
    for kind in PIPELINE_CONFIGS[pipeline].chain:
        parent = stage_key(kind, parent, data.identity(), stage_identity(settings, kind))
        keys.append((kind, parent))
    return keys


def with_log_folder(settings, kind: str, key: str, work_dir: Optional[str] = None):
    """A stage's settings plus where its training logs go (--report_to): <output_dir>/logs/<stage>-<key>/, outside
    the stage store, whose work folders are removed; and where its Trainer checkpoints go (the stage folder's
    `work/` in the store, the same for every process); neither is part of the stage's identity."""
    return settings.replace(
        log_dir=os.path.join(settings.output_dir, 'logs', f'{STAGES[kind].name}-{key}'),
        run_name=f'{os.path.basename(os.path.abspath(settings.output_dir))}/{STAGES[kind].name}-{key}',
        work_dir=work_dir)


def get_or_run_together(store: StageStore, kind: str, key: str, produce, seed: int, where: str, identity: Dict,
                        trains: bool) -> StageNode:
    """A stage in a data-parallel run. The main process alone looks at the store (under the stage's lock) and
    tells the others what it decided: a stage that trains is produced by every process together (each other
    process runs the same step into a scratch folder it throws away, its Trainer sharing the main process's
    checkpoint folder); one that does not train, or is stored, is the main process's alone. Every process
    returns the main process's stored stage."""
    if is_main_process():
        announced = []

        def produce_on_main(folder):
            if not trains:
                return produce(folder)
            broadcast('train')
            announced.append(True)
            with all_processes():
                return produce(folder)
        node = store.get_or_run(kind, key, produce_on_main, seed, where, identity=identity)
        if not announced:
            broadcast('ready')
        return broadcast(node)
    if broadcast() == 'train':
        set_seed(seed)
        with tempfile.TemporaryDirectory(prefix=f'research-{kind}-{key}-') as scratch, all_processes():
            produce(scratch)
    return broadcast()


def run_chain(store: StageStore, pipeline: str, data, settings, label: str) -> List[StageNode]:
    """Produce (or reuse) every stage of one pipeline, each from its parent."""
    nodes = []
    for kind, key in stage_keys(pipeline, data, settings):
        parent = nodes[-1] if nodes else None
        named = with_log_folder(settings, kind, key, os.path.join(store.path(kind, key), WORK_DIR))
        produce = lambda folder, kind=kind, named=named, parent=parent: STAGES[kind].step(parent, data, named, folder)
        where, identity = f' ({pipeline}{label})', stage_identity(settings, kind)
        if is_distributed():
            nodes.append(get_or_run_together(store, kind, key, produce, settings.train_seed, where, identity,
                                             STAGES[kind].trains(named)))
        else:
            made_from = parent.path if parent else settings.teacher_checkpoint or settings.teacher_path
            nodes.append(store.get_or_run(kind, key, produce, settings.train_seed, where, identity=identity,
                                          made_from=made_from))
    return nodes


def stage_names(nodes: Dict[str, List[StageNode]]) -> Dict[str, str]:
    """Stage key -> the name people read: `teacher` for the run's teacher, else `<pipeline>/<stage>` of the
    first pipeline that has it (`+N` when N more share it)."""
    users: Dict[str, List[str]] = {}
    for pipeline, chain in nodes.items():
        for node in chain:
            users.setdefault(node.key, []).append(f'{pipeline}/{STAGES[node.kind].name}')
    def name(shared_by: List[str]) -> str:
        if shared_by[0].endswith('/baseline'):
            return 'teacher'
        return shared_by[0] + (f' (+{len(shared_by) - 1})' if len(shared_by) > 1 else '')
    return {key: name(shared_by) for key, shared_by in users.items()}


def evaluate_side_by_side(nodes: Dict[str, List[StageNode]], data, settings) -> Dict[str, List[Dict]]:
    """Every distinct stage loaded back from disk and measured: quality, size and weights one by one, peak
    memory in a fresh process per stage, then the latency of all stages together in interleaved rounds in this
    process, with the speed-up against the baseline teacher of the same run; compression ratios against it."""
    measured: Dict[str, Dict] = {}
    parents: Dict[str, str] = {}
    for chain in nodes.values():
        for parent, node in zip([None, *chain], chain):
            parents[node.key] = parent.path if parent else None
            if node.key not in measured:
                measured[node.key] = {'stage': STAGES[node.kind].name,
                                      **evaluate_stage(node.path, node.meta['linear_roles'],
                                                       node.meta.get('prune_layers') or settings.prune_layers, data,
                                                       settings, node.key),
                                      **node.meta.get('report', {}), 'stage_key': node.key, 'reused': node.reused}
    paths = {node.key: node.path for chain in nodes.values() for node in chain}
    for key, peak in peak_memory_of_stages(paths, data, settings).items():
        measured[key].update(peak)
    names = stage_names(nodes)   # 'kd_prune_quant/quant' in every line and warning, not a hash
    for teacher_key in {chain[0].key for chain in nodes.values()}:
        group = {names[n.key]: n.path for chain in nodes.values() if chain[0].key == teacher_key for n in chain}
        named_parents = {names[k]: v for k, v in parents.items() if names[k] in group}
        keys = {names[n.key]: n.key for chain in nodes.values() for n in chain}
        for name, latency in measure_side_by_side(group, names[teacher_key], data, settings, named_parents).items():
            measured[keys[name]].update(latency)
    for key, result in measured.items():
        print(f'[eval] {names[key]}: macro-F1 {result["f1_macro"]:.4f}, {result["size_mb"]:.2f} MB on disk '
              f'({result["size_mb_compressed"]:.2f} MB zipped), p50 {result["latency_ms_p50"]:.2f} ms, '
              f'{result["speedup"]:.2f}x [{result["speedup_ci_low"]:.2f}, {result["speedup_ci_high"]:.2f}] the teacher '
              f'(batch {settings.latency_batch_size} x {settings.max_length} tokens, {settings.latency_threads} '
              f'thread(s))' + (' [noisy: did not converge]' if result['latency_noisy'] else ''))
    chains = {p: add_relative_metrics([dict(measured[n.key]) for n in chain]) for p, chain in nodes.items()}
    # 95 % bootstrap intervals and paired tests against the teacher and the parent, on shared resamples
    return add_statistics(chains, settings.bootstrap_resamples, settings.seed, settings.significance_level)


def prepare_folds(args) -> Dict[int, object]:
    """The data of every fold the run scores on, loaded, split and checked (a label a split cannot score is
    refused here, before anything moves or trains)."""
    folds = list(range(args.num_folds)) if args.run_full_kfold else [args.eval_fold]
    prepared = {fold: prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, fold,
                                   args.data_fraction, args.val_fraction, args.seed) for fold in folds}
    for data in prepared.values():   # accumulation that an epoch of the training split cannot fill is refused
        check_optimizer_steps(data, args.batch, args.data_parallel_processes, args.gradient_accumulation_steps)
    return prepared


def run_plan(args, pipelines: List[str], folds: Dict[int, object]) -> Tuple[List[Run], List[Dict]]:
    """Every stage of every fold, seed and pipeline through the store, then measured (main process only; in a
    data-parallel run the others take part in the training and skip the rest)."""
    # An interrupted stage's Trainer checkpoints are kept and resumed from (resumable_checkpoint says which)
    store = StageStore.in_cache_dir(args.cache_dir, reuse=args.reuse_stages, resumable=resumable_checkpoint)
    if is_main_process():
        store.remove_abandoned()                   # half-written stages and temporaries of interrupted runs
        remove_abandoned_temporaries(args.cache_dir)
    runs = []
    for fold, data in folds.items():
        for seed in args.train_seeds:
            first_event = len(store.events)
            settings = {p: pipeline_settings(args, p, seed) for p in pipelines}
            store.plan(key for p in pipelines for _, key in stage_keys(p, data, settings[p]))
            label = f', fold {fold + 1}/{len(folds)}, seed {seed}' if len(folds) * len(args.train_seeds) > 1 else ''
            nodes = {p: run_chain(store, p, data, settings[p], label) for p in pipelines}
            if not is_main_process():
                continue                           # measuring and writing are the main process's
            # Measured after every stage exists, all in this process, so latencies compare side by side.
            runs.append(Run(fold, seed, data, nodes, evaluate_side_by_side(nodes, data, settings[pipelines[0]])))
            for event in store.events[first_event:]:
                event.update(fold=fold, seed=seed)
    return runs, store.events


def split_note(runs: List[Run]) -> str:
    parts = sorted({f'fold {r.data.fold + 1} (test split hash {r.data.test_split_hash}, {len(r.data.test_idx)} texts)' for r in runs})
    return '; '.join(parts)


def write_outputs(args, pipelines: List[str], runs: List[Run], events: List[Dict]) -> None:
    single = len(runs) == 1 and not args.run_ablation
    rows = []
    for run in runs:
        run_dir = args.output_dir if len(runs) == 1 else os.path.join(args.output_dir, 'runs', f'fold{run.fold}_seed{run.seed}')
        for pipeline in pipelines:
            folder = run_dir if single else os.path.join(run_dir, 'pipelines', pipeline)
            export_stage_models(folder, args, pipeline, run.stages[pipeline], run.nodes[pipeline])
            write_pipeline_results(folder, args, pipeline, run.stages[pipeline], run)
            rows.append(final_stage_row(pipeline, run.stages[pipeline], args.label_columns, f'fold{run.fold}_seed{run.seed}'))
    write_json_atomically(os.path.join(args.output_dir, STAGE_LOG), events)
    if single:
        print('\n' + format_stage_table(runs[0].stages[pipelines[0]]))
        return
    summary = summarize_runs(rows)
    write_summary(summary, args.output_dir, args.label_columns, split_note(runs))
    write_plots(summary, args.output_dir, args.label_columns)
    print('\n' + compact_summary(summary))


@contextlib.contextmanager
def usage_errors_logged():
    """A refusal in the middle of a run (e.g. a hub model that cannot be fetched) is printed while run.log
    still records, so the log says why the run stopped."""
    try:
        yield
    except UsageError as exc:
        with contextlib.suppress(OSError):      # a full disk may refuse the log's copy of the message
            print(f'error: {exc}', file=sys.stderr)
        exc.logged = True
        raise


def main(args_list: Optional[List[str]] = None) -> int:
    try:
        # Arguments, every technique's settings and the CSV: all checked before anything moves or trains
        args = parse_compression_arguments(args_list)
        if store_maintenance(args):
            # --cache_prune_older_than / --cache_report: look after --cache_dir, run nothing
            if is_main_process() and args.cache_prune_older_than is not None:
                print(prune_cache(args.cache_dir, args.cache_prune_older_than))
            if is_main_process() and args.cache_report:
                print(cache_report(args.cache_dir))
            return 0
        if args.search:   # settings: search: a budgeted search instead of a plan (research_search)
            return run_search(args, run_chain, stage_keys)
        pipelines = requested_pipelines(args)
        start()                                    # torchrun / accelerate launch: join the process group
        if not is_main_process():
            # Other processes print nothing (the main process's output is the run's) and write nothing:
            # they train together with the main process and wait for it
            show_progress_bars(False)
            transformers_logging.set_verbosity_error()   # its warnings are the main process's too
            with open(os.devnull, 'w', encoding='utf-8') as quiet, contextlib.redirect_stdout(quiet):
                with all_processes(), main_process_first():
                    folds = prepare_folds(args)
                run_plan(args, pipelines, folds)
            finish()
            return 0
        # The data of every fold, split and checked, still before anything in the output folder moves
        with captured_output() as preamble, all_processes(), main_process_first():
            folds = prepare_folds(args)
        # Output folder: one run at a time (its lock), a foreign one is refused, an earlier run's own files archived
        hold_output_folder(args.output_dir)
        prepare_output_dir(args)
        show_progress_bars(args.progress_bars)
        with run_log(os.path.join(args.output_dir, RUN_LOG), preamble.getvalue()), usage_errors_logged(), \
                faults_reported([args.cache_dir, args.output_dir]):
            # Configuration, printed and saved before any long work
            print_compression_config(args, pipelines)
            save_config(args, os.path.join(args.output_dir, CONFIG_JSON), pipelines)
            started = time.time()
            # Stages (shared between pipelines, reused from the store), then every stage measured side by side
            # Does each tokenizer read this language? Counted on training texts, warned about before training
            roles = tokenizer_roles([(pipeline_settings(args, p, args.train_seed), PIPELINE_CONFIGS[p].chain) for p in pipelines])
            fit = report_tokenizer_fit(roles, next(iter(folds.values())), args.seed)
            runs, events = run_plan(args, pipelines, folds)
            for run in runs:
                run.tokenizer_fit = fit
            # Results, exported models, ablation summary and plots
            write_outputs(args, pipelines, runs, events)
            trained = sum(1 for e in events if not e['reused'])
            print(f'\n[done] {", ".join(pipelines)} in {time.time() - started:.0f} s ({trained} stage(s) run, the rest '
                  f'reused); results in {args.output_dir}')
        finish()                                   # the other processes end with the main one
    except UsageError as exc:
        if is_main_process() and not getattr(exc, 'logged', False):
            print(f'error: {exc}', file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:    # Ctrl-C, SIGTERM, a full disk: one line, never a traceback; a bug keeps its own
        code = fault_exit_code(exc)
        if code is None:
            raise
        return code
    finally:
        release_output_folder()                    # the output folder and the stages this run used are free again
        release_stage_uses()
    return 0


if __name__ == '__main__':
    install_signal_handlers()
    sys.exit(main())
