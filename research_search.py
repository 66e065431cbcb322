"""Budgeted search (--search): the best model under a size / speed-up / latency budget, found by Optuna over
the tool's own settings, every trial run through the stage store.

    python research_main.py --search --dataset_path data.csv --author_name me --search_trials 24 \\
        --budget_size_mb 5 --budget_speedup 10

The story: check the space and the storage -> split the data -> prepare the output folder -> open (or
continue) the study, mark the trials of dead processes failed and enqueue them again, enqueue the eight
pipelines with the command line's settings -> trial after trial: Optuna picks settings (TPE), the trial's
pipeline runs through the stage store (the teacher once per search, a student once per distinct student
setting), its final stage is scored on the VALIDATION split (never the test split: selecting on the test split
would make its score an optimistic one) and timed side by side with the teacher -> the outputs
(research_search_report): search_trials.csv, search_pareto.md/.png, search_best/ with test metrics measured once.

Budgets go to Optuna as constraints (Trial.set_constraint, read by TPESampler; values <= 0 within budget; optuna
5 deprecated TPESampler(constraints_func=...) for it) rather than into a penalised objective: every trial keeps its true validation macro-F1 (the CSV and plots show what the setting
scored, not a made-up penalty), and the sampler models feasibility separately from quality, so a trial just over
budget still teaches it which settings score well.

Several processes or machines may add trials to one study (--search_storage, --search_name): each trial
records its owner (pid, host) and a heartbeat; a RUNNING trial whose owner on this host is dead, or whose
heartbeat is older than STALE_SECONDS, is marked failed and its settings are enqueued again. Failed trials do
not count toward --search_trials. Optuna is imported only on the search's own path (OPTUNA_IMPORT_NOTE).
"""

import contextlib
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from research_compression_config import PIPELINE_CONFIGS, STAGES, save_config
from research_data import prepare_data, tokenized_splits
from research_distributed import is_distributed
from research_errors import UsageError
from research_eval import (cached_measurements, measure_side_by_side, predict_probabilities, quality_metrics,
                           size_on_disk_mb, store_measurements)
from research_files import (folder_problem, owner_is_dead, owner_record, remove_abandoned_temporaries,
                            write_json_atomically)
from research_inference import load_compressed_model
from research_models import folder_fingerprint
from research_output import CONFIG_JSON, RUN_LOG, STAGE_LOG, prepare_output_dir, run_log, show_progress_bars
from research_search_report import bootstrap_interval, write_search_outputs
from research_search_space import (choose, corner_choices, describe, load_space, most_compressed_choices,
                                   pipeline_of, space_lines, trial_settings)
from research_stages import StageStore
from research_training import resumable_checkpoint

# `python -X importtime`: optuna 5.0 adds about 0.17 s to research_main's own imports (most of what it needs,
# numpy and friends, is loaded already), so it is imported here, on the search's path, and nowhere else.
OPTUNA_IMPORT_NOTE = 'optuna is imported only when --search runs'
SEARCH_JOURNAL = 'search_study.journal'   # the default study, in --output_dir (kept across runs: not a TOOL_OUTPUT)
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0                      # a trial of another host without a heartbeat for this long is dead
MOST_COMPRESSED = 'most_compressed'        # the anchor trial enqueued after the eight pipelines
REUSED_NAMES = {'teacher': 'teacher', 'kd': 'student', 'prune': 'pruned model', 'quant': 'quantized model'}


def _optuna():
    return importlib.import_module('optuna')


# ---------------------------------------------------------------------------------------------
# Settings checks (before any training) and the storage
# ---------------------------------------------------------------------------------------------

def storage_location(args) -> str:
    return args.search_storage or os.path.join(args.output_dir, SEARCH_JOURNAL)


def is_database_url(location: str) -> bool:
    return '://' in location


def open_storage(location: str):
    """The study storage: an RDB URL (postgresql://, mysql://, sqlite:///) or a journal file path."""
    optuna = _optuna()
    if is_database_url(location):
        try:
            return open_database(location)
        except ImportError as exc:
            raise UsageError(f"--search_storage '{location}' needs a database driver that is not installed "
                             f'({exc}). For PostgreSQL: pip install "psycopg[binary]" (SQLAlchemy 2.1 reads postgresql:// with psycopg 3), '
                             'or pip install psycopg2-binary and write postgresql+psycopg2://...; for MySQL: pip install '
                             'pymysql and write mysql+pymysql://...')
        except Exception as exc:   # sqlalchemy's errors: bad URL, server down, authentication
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--search_storage '{location}' cannot be reached or used: {first}. Check the URL "
                             '(postgresql://user:password@host:5432/dbname), that the server runs and the user may '
                             'create tables, or pass a journal file path instead.')
    backend = optuna.storages.journal.JournalFileBackend(location)
    return optuna.storages.JournalStorage(backend)


def open_database(url: str, attempts: int = 3):
    """An RDBStorage. Processes that start at once on an empty database race to create Optuna's tables (seen
    with PostgreSQL 15: the loser fails with a UniqueViolation on pg_type), so a failure is retried after the
    winner had time to finish; a server that is down fails every attempt."""
    optuna = _optuna()
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(2.0 * (attempt + 1))


def check_search_storage(args) -> None:
    """An explicit --search_storage that cannot serve is refused before any training: a database is connected
    to (its tables are created if missing), a journal file's folder must be writable."""
    if not args.search_storage:
        return        # the default journal goes into --output_dir, already checked
    if is_database_url(args.search_storage):
        open_storage(args.search_storage)
        return
    folder = os.path.dirname(os.path.abspath(args.search_storage))
    problem = ('is a folder, not a file' if os.path.isdir(args.search_storage) else
               (f"sits in '{folder}', which " + folder_problem(folder)) if folder_problem(folder) else None)
    if problem:
        raise UsageError(f"--search_storage '{args.search_storage}' {problem}. Pass the path of a journal file in a "
                         'folder this tool can write, or a database URL (docs/search.md).')


def check_search_inputs(args) -> Dict:
    """Everything --search reads that could be wrong, checked before any training; returns the space."""
    if is_distributed():
        raise UsageError('--search runs one trial at a time in one process; it cannot run under torchrun / accelerate '
                         'launch. Start several plain processes with one --search_storage instead (docs/search.md).')
    space = load_space(args)
    check_search_storage(args)
    return space


# ---------------------------------------------------------------------------------------------
# The study: trials of dead processes, the enqueued pipelines, counting
# ---------------------------------------------------------------------------------------------

def is_stale(trial) -> bool:
    """A RUNNING trial nobody works on: its owner on this host is dead, or its last heartbeat is too old."""
    owner = trial.user_attrs.get('owner')
    if owner_is_dead(owner):
        return True
    beat = trial.user_attrs.get('heartbeat') or (trial.datetime_start.timestamp() if trial.datetime_start else None)
    return beat is not None and time.time() - beat > STALE_SECONDS


def recover_stale_trials(study) -> int:
    """Mark the RUNNING trials of dead processes failed and enqueue their settings again; returns how many."""
    optuna = _optuna()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_stale(trial):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except Exception:      # another process recovered it first (or its owner finished after all)
            continue
        study.enqueue_trial(trial.params, user_attrs={'retry_of': trial.number, **{
            k: trial.user_attrs[k] for k in ('corner', 'anchor') if k in trial.user_attrs}})
        owner = trial.user_attrs.get('owner') or {}
        print(f'[search] trial {trial.number} was left running by pid {owner.get("pid")} on {owner.get("host")}, '
              'which is gone: marked failed, its settings queued again')
        recovered += 1
    return recovered


def enqueue_corners(study, args, space: Dict) -> None:
    """The eight pipelines with the command line's settings, first (once per study), so the search never ends
    worse than the ablation under the same budget; then the space's most compressed setting."""
    for pipeline in PIPELINE_CONFIGS:
        study.enqueue_trial(corner_choices(args, pipeline), user_attrs={'corner': pipeline}, skip_if_exists=True)
    study.enqueue_trial(most_compressed_choices(space, args), user_attrs={'anchor': MOST_COMPRESSED},
                        skip_if_exists=True)


def progress(study) -> int:
    """Trials that count toward --search_trials: finished (complete or pruned) plus those live processes run."""
    states = _optuna().trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return sum(1 for t in trials if t.state in (states.COMPLETE, states.PRUNED)
               or (t.state == states.RUNNING and not is_stale(t)))


def finished(study) -> int:
    states = _optuna().trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))


def open_study(args):
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # the [search] lines say what happens
    storage = open_storage(storage_location(args))
    study = optuna.create_study(study_name=args.search_name, storage=storage, direction='maximize', load_if_exists=True)
    # A fresh study is seeded by --seed (the same search twice proposes the same settings); a continued one, or
    # one other processes share, mixes in its size and this pid so it does not re-propose what they proposed
    seed = args.seed if not study.trials else (args.seed + 7919 * len(study.trials) + os.getpid()) % 2**32
    study.sampler = optuna.samplers.TPESampler(seed=seed)   # reads each trial's constraints (Trial.set_constraint)
    return study


# ---------------------------------------------------------------------------------------------
# Budgets and one trial's measurements
# ---------------------------------------------------------------------------------------------

def budget_list(args) -> List[tuple]:
    """(name, limit) of every budget given."""
    return [(n, getattr(args, n)) for n in ('budget_size_mb', 'budget_speedup', 'budget_latency_ms')
            if getattr(args, n) is not None]


def constraint_values(args, measured: Dict) -> List[float]:
    """Optuna constraints, <= 0 within budget: size - limit, limit - speed-up, p50 - limit."""
    values = []
    for name, limit in budget_list(args):
        if name == 'budget_size_mb':
            values.append(measured['size_mb'] - limit)
        elif name == 'budget_speedup':
            values.append(limit - measured['speedup'])
        else:
            values.append(measured['latency_ms_p50'] - limit)
    return values


def validation_quality(node, data, settings) -> Dict:
    """Macro-F1 of a stored stage on the VALIDATION split with a bootstrap interval, measured once per stage
    (and threshold): it depends only on the stage's verified files and the split."""
    fingerprint = json.dumps(['val', settings.threshold, data.identity(), folder_fingerprint(node.path)])
    found = cached_measurements(settings.cache_dir, node.key, 'val_quality', fingerprint)
    if found is None:
        classifier = load_compressed_model(node.path)
        val = tokenized_splits(data, classifier.tokenizer, settings.max_length, settings.cache_dir).val
        labels, probs = predict_probabilities(classifier, val)
        metrics = quality_metrics(labels, probs, classifier.label_names, settings.threshold)
        low, high = bootstrap_interval(labels, probs >= settings.threshold, seed=settings.seed)
        found = {'val_f1_macro': metrics['f1_macro'], 'val_f1_low': low, 'val_f1_high': high}
        store_measurements(settings.cache_dir, node.key, 'val_quality', fingerprint, found)
    return found


def measure_trial(nodes, data, settings) -> Dict:
    """The final stage's validation quality, its size on disk, and its latency timed side by side with the
    teacher in interleaved rounds (the speed-up the tool reports everywhere)."""
    teacher, final = nodes[0], nodes[-1]
    measured = {**validation_quality(final, data, settings), 'size_mb': size_on_disk_mb(final.path)}
    group = {teacher.key: teacher.path, final.key: final.path}
    parents = {final.key: nodes[-2].path} if len(nodes) > 1 else {}
    timed = measure_side_by_side(group, teacher.key, data, settings, parents)[final.key]
    measured.update({k: timed.get(k) for k in ('speedup', 'speedup_iqr', 'latency_ms_p50', 'latency_noisy')})
    return measured


# ---------------------------------------------------------------------------------------------
# The trials
# ---------------------------------------------------------------------------------------------

@dataclass
class SearchContext:
    args: object
    space: Dict
    data: object
    store: StageStore
    run_chain: Callable      # research_main.run_chain and .stage_keys, passed in (research_main imports this module)
    stage_keys: Callable


@contextlib.contextmanager
def heartbeat(trial):
    """Record the owner, then a heartbeat every HEARTBEAT_SECONDS while the trial runs (other processes judge
    by it whether the trial is still worked on)."""
    trial.set_user_attr('owner', owner_record())
    trial.set_user_attr('heartbeat', time.time())
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                trial.set_user_attr('heartbeat', time.time())
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def validate_trial(settings, pipeline: str) -> None:
    for kind in PIPELINE_CONFIGS[pipeline].chain:
        STAGES[kind].validate(settings)


def run_trial(trial, ctx: SearchContext) -> Dict:
    """Choose, produce (through the store) and measure one trial; returns what its user attributes record."""
    chosen = choose(trial, ctx.space, ctx.args)
    settings = trial_settings(ctx.args, chosen)
    pipeline = pipeline_of(chosen)
    record = {'chosen': chosen, 'pipeline': pipeline, 'description': describe(chosen, settings)}
    validate_trial(settings, pipeline)
    known = set(ctx.store.nodes)
    # "[plan] stage i of n": n counts the trial's stages this process has not produced or loaded yet
    ctx.store.plan(key for _, key in ctx.stage_keys(pipeline, ctx.data, settings) if key not in known)
    nodes = ctx.run_chain(ctx.store, pipeline, ctx.data, settings, f', trial {trial.number}')
    record['stage_keys'] = [f'{n.kind}-{n.key}' for n in nodes]
    record['reused'] = [n.kind for n in nodes if n.key in known or n.reused]
    record['produced'] = [n.kind for n in nodes if not (n.key in known or n.reused)]
    measured = measure_trial(nodes, ctx.data, settings)
    record.update(measured)
    record['constraints'] = constraint_values(ctx.args, measured)
    record['feasible'] = all(c <= 0 for c in record['constraints'])
    return record


def best_feasible_value(study, exclude: Optional[int] = None) -> Optional[float]:
    states = _optuna().trial.TrialState
    values = [t.value for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
              if t.number != exclude and t.user_attrs.get('feasible')]
    return max(values) if values else None


def trial_line(position: int, number: int, args, record: Dict, best_before: Optional[float]) -> str:
    """`[search] trial 7/24 (#6): kd(L2, ...) → structured 60 % → int8: val macro-F1 0.46 [0.43, 0.49], 2.3 MB,
    10.4x — feasible, best so far (reused teacher, student)`."""
    verdict = 'feasible' if record['feasible'] else 'over budget'
    if record['feasible'] and (best_before is None or record['val_f1_macro'] >= best_before):
        verdict += ', best so far'
    latency = f', p50 {record["latency_ms_p50"]:.2f} ms' if args.budget_latency_ms is not None else ''
    reused = ', '.join(REUSED_NAMES[k] for k in record['reused'])
    return (f'[search] trial {position}/{args.search_trials} (#{number}): {record["description"]}: val macro-F1 '
            f'{record["val_f1_macro"]:.2f} [{record["val_f1_low"]:.2f}, {record["val_f1_high"]:.2f}], '
            f'{record["size_mb"]:.2f} MB, {record["speedup"]:.1f}x{latency} — {verdict} '
            f'({"reused " + reused if reused else "nothing reused"})')


def one_trial(study, ctx: SearchContext) -> None:
    """Ask, run, tell: a trial whose settings cannot run (a UsageError from a stage's checks) is pruned with
    the reason; any other error fails the trial and stops the search."""
    states = _optuna().trial.TrialState
    trial = study.ask()
    with heartbeat(trial):
        try:
            record = run_trial(trial, ctx)
        except UsageError as exc:
            trial.set_user_attr('note', str(exc))
            study.tell(trial, state=states.PRUNED)
            print(f'[search] trial {finished(study)}/{ctx.args.search_trials} (#{trial.number}): settings that cannot run, skipped: {exc}')
            return
        except BaseException:
            with contextlib.suppress(Exception):
                study.tell(trial, state=states.FAIL)
            raise
        for name, value in record.items():
            trial.set_user_attr(name, value)
        for (budget, _), value in zip(budget_list(ctx.args), record['constraints']):
            trial.set_constraint(budget, value)
        best_before = best_feasible_value(study, exclude=trial.number)
        study.tell(trial, record['val_f1_macro'])
    print(trial_line(finished(study), trial.number, ctx.args, record, best_before))
    if trial.user_attrs.get('anchor') == MOST_COMPRESSED and not record['feasible']:
        missed = [n[len('budget_'):] for (n, _), c in zip(budget_list(ctx.args), record['constraints']) if c > 0]
        print(f'[search] the most compressed setting of the space misses the {" and ".join(missed)} budget: few or '
              'no trials can meet it; widen the space (--search_space) or the budget')


def run_trials(study, ctx: SearchContext) -> int:
    """Trials until the study holds --search_trials that count (this process's share when others run too)."""
    ran = 0
    while True:
        recover_stale_trials(study)
        if progress(study) >= ctx.args.search_trials:
            return ran
        one_trial(study, ctx)
        ran += 1


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def print_search_config(args, space: Dict) -> None:
    print('\n' + '=' * 72)
    print('BUDGETED SEARCH')
    print('=' * 72)
    budgets = budget_list(args)
    print('Budget:   ' + (', '.join(f'{n[len("budget_"):]} {"<=" if n != "budget_speedup" else ">="} {v:g}'
                                    for n, v in budgets) or 'none (every trial is feasible)'))
    print(f'Trials:   {args.search_trials} in study {args.search_name!r} at {storage_location(args)}')
    print(f'Data:     {args.dataset_path}  fold {args.eval_fold} of {args.num_folds}, fraction {args.data_fraction}, '
          f'max_length {args.max_length}; trials are scored on the validation split')
    print(f'Teacher:  {args.teacher_checkpoint or args.teacher_path}')
    print('Space:')
    print('\n'.join(space_lines(space)))
    print(f'Output:   {args.output_dir}')
    print('=' * 72 + '\n')


def run_search(args, run_chain: Callable, stage_keys: Callable) -> int:
    """--search, from the checks to the outputs; returns the exit code (0 also when no trial met the budget)."""
    space = check_search_inputs(args)
    data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, args.eval_fold,
                        args.data_fraction, args.val_fraction, args.seed)
    prepare_output_dir(args)
    show_progress_bars(args.progress_bars)
    with run_log(os.path.join(args.output_dir, RUN_LOG)):
        print_search_config(args, space)
        save_config(args, os.path.join(args.output_dir, CONFIG_JSON), list(PIPELINE_CONFIGS))
        started = time.time()
        store = StageStore.in_cache_dir(args.cache_dir, reuse=args.reuse_stages, resumable=resumable_checkpoint)
        store.remove_abandoned()
        remove_abandoned_temporaries(args.cache_dir)
        study = open_study(args)
        recover_stale_trials(study)
        enqueue_corners(study, args, space)
        ctx = SearchContext(args, space, data, store, run_chain, stage_keys)
        ran = run_trials(study, ctx)
        write_json_atomically(os.path.join(args.output_dir, STAGE_LOG), store.events)
        write_search_outputs(study, ctx)
        produced = sum(1 for e in store.events if not e['reused'])
        print(f'\n[done] search: {ran} trial(s) run here in {time.time() - started:.0f} s ({produced} stage(s) '
              f'produced, the rest reused); the study holds {finished(study)}; results in {args.output_dir}')
    return 0
