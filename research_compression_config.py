"""Configuration: the stage kinds (their steps, checks, and the settings each step reads), every run's
settings parsed and validated once, and the configuration print and record.

The settings themselves are declared in `research_settings` (typed groups, one field per flag). Method
choices come from the registries in the technique modules (a test checks that `research_settings` names
the same keys), so adding a method is adding one function and one entry there; adding a pipeline is one
entry in `PIPELINE_CONFIGS`. Every setting is checked here, once, before any work: each field against its
declared range, each technique's `validate(settings)` for every pipeline the run executes, plus the CSV.

A stored stage's identity is exactly the settings its step reads (`STAGES[kind].reads(settings)`, which may
depend on the method), less those declared `result=False` (where files go, what is printed). A test runs
every kind's step behind a recording proxy and fails when a step reads a setting its declaration lacks.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import research_kd
import research_pruning
import research_quantization
import research_training
from research_data import load_labeled_csv
from research_distributed import check_launch, launched_processes
from research_errors import UsageError
from research_files import folder_problem, write_json_atomically
from research_models import folder_fingerprint
from research_output_guard import refuse_empty_paths, refuse_overlap
from research_quantization import resolve_quant_dtype
from research_settings import (FIELD_OWNER, LABEL_COLUMNS, PIPELINE_CONFIGS, TOOL_OUTPUTS, Pipeline, Settings,
                               build_argument_parser, changes_result, default_settings, out_of_range,
                               settings_from_namespace)
from research_training import validate_trimming

__all__ = ['LABEL_COLUMNS', 'PIPELINE_CONFIGS', 'TOOL_OUTPUTS', 'Pipeline', 'STAGES', 'parse_compression_arguments',
           'pipeline_settings', 'stage_identity', 'requested_pipelines', 'build_argument_parser']

TOOL_MARKER = 'research_compression'   # config.json of a run of this tool says so (the archive relies on it)


# ---------------------------------------------------------------------------------------------
# What each stage kind's step reads
# ---------------------------------------------------------------------------------------------

# Every step that trains reads these (research_training.training_arguments); the split is in the data key.
TRAINING_READS = ('label_columns', 'max_length', 'batch', 'lr', 'warmup_ratio', 'weight_decay', 'gradient_clip_norm',
                  'early_stopping_patience', 'gradient_accumulation_steps', 'mixed_precision', 'group_by_length', 'train_seed',
                  'cache_dir', 'progress_bars', 'report_to', 'log_dir', 'run_name', 'work_dir')
FINE_TUNE_READS = ('fine_tune_epochs', 'fine_tune_lr')
# Not read by a step but by the Trainer from the launch: the processes that train together (the effective batch).
LAUNCH_IDENTITY = ('data_parallel_processes',)


def vocab_reads(s) -> Tuple[str, ...]:
    return ('trim_vocab', 'trim_vocab_min_count', 'trim_vocab_keep') if s.trim_vocab else ('trim_vocab',)


def teacher_reads(s) -> Tuple[str, ...]:
    if s.teacher_checkpoint:   # loaded, not trained (its files are part of the identity: stage_identity)
        return ('teacher_checkpoint', 'label_columns', 'max_length', 'allow_teacher_split_mismatch')
    return TRAINING_READS + ('teacher_checkpoint', 'teacher_path', 'teacher_epochs', 'dropout')


def kd_reads(s) -> Tuple[str, ...]:
    student = ('student_layers',) if s.student_layers else ('student_layers', 'student_path', 'dropout')
    losses = {'logit': (), 'hidden': ('hidden_loss_weight', 'kd_layer_map'),
              'attention': ('attention_loss_weight', 'kd_layer_map'),
              'multi_level': ('hidden_loss_weight', 'attention_loss_weight', 'kd_layer_map')}[s.kd_method]
    return TRAINING_READS + student + losses + vocab_reads(s) + ('kd_method', 'kd_alpha', 'kd_temperature', 'epochs')


def prune_reads(s) -> Tuple[str, ...]:
    method = {'magnitude': (), 'wanda': ('calibration_samples',), 'structured': ('calibration_samples',),
              'gradual': ('prune_schedule', 'prune_start_epoch', 'prune_end_epoch', 'prune_frequency')}[s.prune_method]
    fine_tune = TRAINING_READS + FINE_TUNE_READS if s.fine_tune_after_prune or s.prune_method == 'gradual' else ()
    return (('label_columns', 'max_length', 'cache_dir', 'prune_method', 'prune_sparsity', 'prune_layers',
             'fine_tune_after_prune') + method + fine_tune + vocab_reads(s))


def quant_reads(s) -> Tuple[str, ...]:
    method = {'static': ('quant_calibration_batches', 'batch'), 'qat': TRAINING_READS + FINE_TUNE_READS,
              'fp16': ('quant_dtype_resolved',), 'int4': ('quant_dtype_resolved',)}   # dynamic is int8 only
    return (('label_columns', 'max_length', 'cache_dir', 'quant_method') + method.get(s.quant_method, ())
            + vocab_reads(s))


@dataclass(frozen=True)
class StageKind:
    """One kind of stage: its name in the results, the step that produces it from its parent
    (`step(parent, data, settings, out_dir) -> meta`), the check of its settings, its flow label, the settings
    its step reads (`reads(settings)`), and whether the step trains with given settings (`trains(settings)`:
    then every process of a data-parallel run takes part; otherwise the main process makes the stage alone)."""
    name: str
    step: Callable
    validate: Callable
    describe: Callable
    reads: Callable
    trains: Callable = lambda settings: True


def _describe_prune(a) -> str:
    return f'Prune[{a.prune_method} {a.prune_sparsity:.0%}]' + (' -> Fine-tune' if a.fine_tune_after_prune else '')


STAGES: Dict[str, StageKind] = {
    'teacher': StageKind('baseline', research_training.step, research_training.validate,
                         lambda a: 'Teacher' + (' (checkpoint)' if a.teacher_checkpoint else ' (fine-tune)'),
                         teacher_reads, research_training.trains),
    'kd': StageKind('kd', research_kd.step, research_kd.validate, lambda a: f'KD[{a.kd_method}] -> Student',
                    kd_reads, research_kd.trains),
    'prune': StageKind('prune', research_pruning.step, research_pruning.validate, _describe_prune,
                       prune_reads, research_pruning.trains),
    'quant': StageKind('quant', research_quantization.step, research_quantization.validate,
                       lambda a: f'Quantize[{a.quant_method}]', quant_reads, research_quantization.trains),
}


def identity_fields(settings, kind: str) -> Tuple[str, ...]:
    """The settings that decide what a stage of `kind` produces with these settings: what its step reads,
    less what cannot change its result."""
    launch = LAUNCH_IDENTITY if STAGES[kind].trains(settings) else ()
    return tuple(sorted({name for name in STAGES[kind].reads(settings) + launch if changes_result(name)}))


def stage_identity(settings, kind: str) -> Dict:
    """The settings that make up a stage's identity in the store (with the teacher checkpoint's files)."""
    identity = {name: getattr(settings, name) for name in identity_fields(settings, kind)}
    if kind == 'teacher' and settings.teacher_checkpoint and os.path.isdir(settings.teacher_checkpoint):
        identity['teacher_checkpoint_files'] = folder_fingerprint(settings.teacher_checkpoint)
    return identity


def settings_from_record(record: Dict) -> Settings:
    """Settings rebuilt from a flat record (config.json, `Settings.as_dict()`); unknown names are ignored and
    config.json's `quant_dtype` (the resolved type) fills the resolved field."""
    known = {name: value for name, value in record.items() if name in FIELD_OWNER}
    known.setdefault('quant_dtype_resolved', record.get('quant_dtype') or 'int8')
    return default_settings().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


def stage_summary(kind: str, identity: Dict) -> str:
    """A stored stage's telling settings in one line (for --cache_report), from the identity it was keyed by."""
    names = SUMMARY_SETTINGS.get(kind, ()) + ('max_length', 'train_seed')
    return ' '.join(f'{name}={identity[name]}' for name in names if identity.get(name) not in (None, '', False))


SUMMARY_SETTINGS = {
    'teacher': ('teacher_checkpoint', 'teacher_path', 'teacher_epochs', 'lr'),
    'kd': ('kd_method', 'kd_alpha', 'kd_temperature', 'student_layers', 'student_path', 'epochs'),
    'prune': ('prune_method', 'prune_sparsity', 'prune_layers', 'prune_schedule', 'fine_tune_epochs'),
    'quant': ('quant_method', 'quant_dtype_resolved'),
}


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------

def requested_pipelines(args) -> List[str]:
    return list(args.ablation_pipelines) if args.run_ablation else [args.pipeline]


def pipeline_settings(args: Settings, pipeline: str, seed: int) -> Settings:
    """A copy of the run's settings for one pipeline and training seed (the run's own settings never change)."""
    overrides = dict(PIPELINE_CONFIGS[pipeline].overrides)
    settings = args.replace(train_seed=seed, **overrides)
    dtype = overrides.get('quant_dtype_resolved') or resolve_quant_dtype(settings.quant_method, settings.quant_dtype)
    return settings.replace(quant_dtype_resolved=dtype)


def store_maintenance(args) -> bool:
    """Whether the command only reports on or prunes --cache_dir (no dataset, no run)."""
    return args.cache_report or args.cache_prune_older_than is not None


def parse_compression_arguments(args_list: Optional[List[str]] = None) -> Settings:
    """Parse and validate everything (arguments, every technique of every requested pipeline, the CSV, the
    output and cache folders); raises UsageError with the fix on anything that cannot work, before any work
    is done."""
    parser = build_argument_parser()
    args = settings_from_namespace(parser.parse_args(args_list))
    problems = out_of_range(args)
    if problems:
        raise UsageError(' '.join(problems))
    if store_maintenance(args):
        if not os.path.isdir(args.cache_dir):
            raise UsageError(f"--cache_dir '{args.cache_dir}' is not a folder, so there is no stage store to report on "
                             'or prune. Pass the --cache_dir your runs used (default ./cache).')
        return args
    missing = [flag for flag in ('--dataset_path', '--author_name') if getattr(args, flag[2:]) is None]
    if missing:
        parser.error(f'the following arguments are required: {", ".join(missing)}')
    if args.pipeline not in PIPELINE_CONFIGS:
        raise UsageError(f"Unknown pipeline '{args.pipeline}'. Choose one of: {', '.join(PIPELINE_CONFIGS)}.")
    unknown = [p for p in args.ablation_pipelines if p not in PIPELINE_CONFIGS]
    if unknown or not args.ablation_pipelines:
        raise UsageError(f"Unknown pipeline(s) in --ablation_pipelines: {', '.join(unknown) or '(none given)'}. "
                         f"Choose from: {', '.join(PIPELINE_CONFIGS)}.")
    seeds = tuple(args.seeds) if args.seeds else (args.seed,)
    # torchrun / accelerate launch: each process trains on its share of every batch (effective batch = --batch
    # x processes x --gradient_accumulation_steps)
    args = args.replace(train_seeds=seeds, train_seed=seeds[0], data_parallel_processes=launched_processes(),
                        quant_dtype_resolved=resolve_quant_dtype(args.quant_method, args.quant_dtype))
    check_launch()          # several GPUs under plain python: refused, with the torchrun line
    validate_arguments(args)
    return args


# settings: statistics
def validate_statistics(args: Settings) -> None:
    """--bootstrap_resamples is 0 or at least 1000 (the other statistics settings are bounded where declared)."""
    if 0 < args.bootstrap_resamples < 1000:
        raise UsageError(f'--bootstrap_resamples must be 0 (no statistics) or at least 1000 (fewer make the 2.5 % tails '
                         f'of a 95 % interval rest on a handful of resamples), got {args.bootstrap_resamples}. The '
                         'default is 10000.')


def validate_arguments(args: Settings) -> None:
    """Settings every run shares (each field's own range was checked from its declaration), the output and cache
    folders, the CSV's header and labels, then each requested pipeline's stages with that pipeline's settings
    (e.g. --max_length against the models' configs). The split-dependent checks (a label never positive in a
    split) follow in research_data.prepare_data."""
    refuse_empty_paths(args)   # settings: run folders (an empty path would silently mean the working directory)
    duplicated = sorted({c for c in args.label_columns if args.label_columns.count(c) > 1})
    repeated_seeds = sorted({s for s in args.train_seeds if args.train_seeds.count(s) > 1})
    checks = [
        (not repeated_seeds, f'--seeds repeats {", ".join(map(str, repeated_seeds))}: the same seed twice is the same '
                             'run twice, reported as a repetition (a spread of 0). Give each seed once, e.g. 42,43,44.'),
        (args.eval_fold < args.num_folds, f'--eval_fold must be in [0, {args.num_folds - 1}], got {args.eval_fold}.'),
        (len(args.label_columns) >= 1, '--label_columns must name at least one column.'),
        (not duplicated, f'--label_columns names {", ".join(duplicated)} more than once; name each label column once.'),
        (args.text_column not in args.label_columns, f"--text_column '{args.text_column}' is also in --label_columns; the "
                                                     'text column holds the comments, the label columns their 0/1 labels.'),
        (not args.trim_vocab or any(len(PIPELINE_CONFIGS[p].chain) > 1 for p in requested_pipelines(args)),
         '--trim_vocab trims the student before distillation, or the teacher entering pruning or quantization; '
         'the requested pipeline(s) have none of these stages, so it would do nothing. Drop --trim_vocab, or '
         'choose a pipeline with kd, prune or quant.'),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    validate_statistics(args)
    check_search_settings(args)
    for flag, folder, what in (('--output_dir', args.output_dir, 'results and models'),
                               ('--cache_dir', args.cache_dir, 'the stage store and caches')):
        problem = folder_problem(folder)
        if problem:
            raise UsageError(f"{flag} '{folder}' {problem}. It must be a folder this tool can create or write "
                             f'({what}): choose another path with {flag}.')
    refuse_overlap(args.output_dir, args.cache_dir, TOOL_OUTPUTS)   # settings: run folders (archive vs store)
    load_labeled_csv(args.dataset_path, args.text_column, args.label_columns)
    for pipeline in requested_pipelines(args):
        settings = pipeline_settings(args, pipeline, args.train_seeds[0])
        for kind in PIPELINE_CONFIGS[pipeline].chain:
            STAGES[kind].validate(settings)
        if 'kd' not in PIPELINE_CONFIGS[pipeline].chain and len(PIPELINE_CONFIGS[pipeline].chain) > 1:
            # without KD, --trim_vocab trims the teacher entering prune/quant (KD's validate checks its student)
            validate_trimming(settings, settings.teacher_checkpoint or settings.teacher_path)


def check_search_settings(args: Settings) -> None:
    """# settings: search. The numbers of --search (its space file and storage are read by research_search)."""
    given = [f for f in ('budget_size_mb', 'budget_speedup', 'budget_latency_ms', 'search_space', 'search_storage')
             if getattr(args, f) is not None]
    if not args.search:
        if given:
            raise UsageError(f'--{given[0]} is a setting of --search; add --search, or drop it.')
        return
    if args.run_ablation:
        raise UsageError('--search and --run_ablation are two ways of running: the search runs the eight pipelines '
                         'as its first trials anyway. Drop one of them.')
    # --search_trials >= 1 and budgets > 0 are checked from their declarations (research_settings.SearchSettings)
    if len(args.train_seeds) > 1 or args.run_full_kfold:
        raise UsageError('--search scores trials on one split with one training seed; drop --seeds / '
                         '--run_full_kfold (run the best settings with them afterwards).')
    if not args.search_name.strip():
        raise UsageError('--search_name must not be empty.')


# ---------------------------------------------------------------------------------------------
# The configuration, printed and recorded
# ---------------------------------------------------------------------------------------------

def stage_flow(settings, pipeline: str) -> List[str]:
    """The stages of `pipeline` with these settings' methods."""
    return [STAGES[kind].describe(settings) for kind in PIPELINE_CONFIGS[pipeline].chain] + ['Evaluate']


def planned_techniques(pipelines: Sequence[str]) -> Dict[str, bool]:
    """Which techniques any of `pipelines` uses (an ablation prints and records the settings of all)."""
    used = {kind for p in pipelines for kind in PIPELINE_CONFIGS[p].chain}
    return {'enable_kd': 'kd' in used, 'enable_pruning': 'prune' in used, 'enable_quantization': 'quant' in used}


def _print_plan(args: Settings, pipelines: Sequence[str]) -> None:
    if len(pipelines) == 1 and not args.run_ablation:
        print(f'Pipeline: {pipelines[0].upper()}  ({PIPELINE_CONFIGS[pipelines[0]].description})')
        print('Flow:     ' + ' -> '.join(stage_flow(pipeline_settings(args, pipelines[0], args.train_seeds[0]), pipelines[0])))
    else:
        print(f'Ablation: {len(pipelines)} pipelines as one plan of shared stages')
        for pipeline in pipelines:
            print(f'  {pipeline:<15} ' + ' -> '.join(stage_flow(pipeline_settings(args, pipeline, args.train_seeds[0]), pipeline)))


def _print_techniques(args: Settings, shown: Settings, uses: Dict[str, bool]) -> None:
    if uses['enable_kd']:
        student = f'derived from teacher, layers={args.student_layers}' if args.student_layers else args.student_path
        print(f'Student:  {student}  method={shown.kd_method} alpha={shown.kd_alpha} T={shown.kd_temperature} epochs={args.epochs}')
    if uses['enable_pruning']:
        print(f'Pruning:  {shown.prune_method} sparsity={shown.prune_sparsity:.0%} layers={shown.prune_layers} '
              f'fine-tune={"%d epochs" % shown.fine_tune_epochs if shown.fine_tune_after_prune else "no"}')
    if uses['enable_quantization']:
        print(f'Quant:    {shown.quant_method} ({shown.quant_dtype_resolved})')
    if args.trim_vocab:
        print(f'Vocab:    trimmed to the training texts (min count {args.trim_vocab_min_count}'
              + (f', always kept: {",".join(args.trim_vocab_keep)}' if args.trim_vocab_keep else '') + ')')


def print_compression_config(args: Settings, pipelines: Sequence[str]) -> None:
    print('\n' + '=' * 72)
    print('COMPRESSION CONFIGURATION')
    print('=' * 72)
    _print_plan(args, pipelines)
    print(f'Data:     {args.dataset_path}  text={args.text_column}  labels={",".join(args.label_columns)}')
    print(f'          folds={args.num_folds} eval_fold={args.eval_fold} fraction={args.data_fraction} '
          f'max_length={args.max_length} seed={args.seed}')
    if args.data_parallel_processes > 1:
        print(f'Parallel: {args.data_parallel_processes} processes (DDP), effective batch {args.batch} x '
              f'{args.data_parallel_processes} x {args.gradient_accumulation_steps} accumulation step(s)')
    print(f'Teacher:  {args.teacher_checkpoint or args.teacher_path}'
          + ('  (checkpoint: skip training)' if args.teacher_checkpoint else f'  epochs={args.teacher_epochs}'))
    # A single pipeline prints its own settings (a pipeline entry may fix a method); an ablation, the arguments.
    shown = pipeline_settings(args, pipelines[0], args.train_seeds[0]) if len(pipelines) == 1 else args
    _print_techniques(args, shown, planned_techniques(pipelines))
    print(f'Output:   {args.output_dir}')
    print('=' * 72 + '\n')


def config_record(args: Settings, pipelines: Sequence[str]) -> Dict:
    """The resolved settings as one flat record, with the pipelines this run executes and the technique flags;
    for an ablation the flags say what any of its pipelines uses (`pipeline` is then null: there are several).
    `quant_dtype` is the resolved storage type (what the stages used)."""
    record = {**args.as_dict(), 'tool': TOOL_MARKER, 'pipelines': list(pipelines), **planned_techniques(pipelines)}
    record['quant_dtype'] = record.pop('quant_dtype_resolved')
    for name in ('work_dir', 'log_dir', 'run_name'):
        record.pop(name, None)
    if len(pipelines) > 1 or args.run_ablation:
        record['pipeline'] = None
    return record


def save_config(args: Settings, path: str, pipelines: Sequence[str]) -> None:
    write_json_atomically(path, dict(sorted(config_record(args, pipelines).items())))
