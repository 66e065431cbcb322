"""Entry point: chains the stages of the chosen pipeline (teacher -> KD -> prune -> quantize), evaluates
every stage on the same test split, and writes the results.

    python research_main.py --pipeline kd_prune_quant --dataset_path data.csv --author_name me ...
"""

import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

from research_compression_config import (PIPELINE_CONFIGS, parse_compression_arguments, parse_student_layers,
                                         print_compression_config, save_config)
from research_errors import UsageError

RESULTS_JSON = 'results_final.json'
RESULTS_CSV = 'results_final.csv'
CONFIG_JSON = 'config.json'
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


def stage_dir(args, stage: str) -> str:
    return os.path.join(args.output_dir, 'stages', stage)


def planned_stages(args) -> List[str]:
    return ['baseline'] + [stage for stage, on in (('kd', args.enable_kd), ('prune', args.enable_pruning),
                                                   ('quant', args.enable_quantization)) if on]


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def obtain_teacher(args, data):
    """The fine-tuned teacher: loaded from --teacher_checkpoint (head included), or fine-tuned here."""
    from research_data import positive_class_weights, tokenized_splits
    from research_models import load_encoder_for_classification, load_fine_tuned_classifier
    from research_training import train_classifier
    if args.teacher_checkpoint:
        print(f'[teacher] loading fine-tuned checkpoint {args.teacher_checkpoint} (training skipped)')
        return load_fine_tuned_classifier(args.teacher_checkpoint, args.label_columns)
    model, tokenizer = load_encoder_for_classification(args.teacher_path, args.label_columns, args.dropout)
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    print(f'[teacher] fine-tuning {args.teacher_path} for up to {args.teacher_epochs} epochs')
    model, _ = train_classifier(model, tokenizer, splits.train, splits.val, positive_class_weights(data.labels[data.train_idx]),
                                args, os.path.join(args.output_dir, 'work', 'teacher'), args.teacher_epochs, args.lr)
    return model, tokenizer


def build_student(args, teacher, teacher_tokenizer):
    """The student: derived from the teacher (--student_layers), or a pretrained encoder (--student_path)."""
    from research_kd import derive_student_from_teacher
    from research_models import load_encoder_for_classification
    if args.student_layers:
        return derive_student_from_teacher(teacher, parse_student_layers(args.student_layers)), teacher_tokenizer
    return load_encoder_for_classification(args.student_path, args.label_columns, args.dropout)


def evaluate_stage(args, stage: str, model_dir: str, pruned_layer_names, splits_test, extra: Optional[Dict] = None) -> Dict:
    """Load the stage back from disk and measure it: what is reported is what was saved."""
    from research_eval import evaluate_saved_model
    from research_inference import load_compressed_model
    classifier = load_compressed_model(model_dir)
    result = {'stage': stage}
    result.update(evaluate_saved_model(classifier, model_dir, splits_test, pruned_layer_names, args.threshold,
                                       args.latency_batch_size, args.max_length, args.latency_runs))
    result.update(extra or {})
    print(f'[eval] {stage}: macro-F1 {result["f1_macro"]:.4f}, {result["size_mb"]:.2f} MB on disk, '
          f'p50 {result["latency_ms_p50"]:.2f} ms (batch {args.latency_batch_size} x {args.max_length} tokens)')
    return result


def stage_info(args, stage: str) -> Dict:
    return {'stage': stage, 'pipeline': args.pipeline, 'label_names': list(args.label_columns),
            'max_length': args.max_length, 'threshold': args.threshold}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def write_json_atomically(path: str, payload) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        json.dump(payload, fh, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def write_results(args, stages: List[Dict], data) -> None:
    import pandas as pd
    from research_eval import flatten_stage
    payload = {'pipeline': args.pipeline, 'author_name': args.author_name, 'fold': data.fold,
               'test_split_hash': data.test_split_hash, 'test_rows': int(len(data.test_idx)), 'stages': stages}
    rows = pd.DataFrame([flatten_stage(s, args.label_columns) for s in stages])
    rows.insert(0, 'pipeline', args.pipeline)
    tmp_csv = os.path.join(args.output_dir, RESULTS_CSV + '.tmp')
    rows.to_csv(tmp_csv, index=False)
    os.replace(tmp_csv, os.path.join(args.output_dir, RESULTS_CSV))
    write_json_atomically(os.path.join(args.output_dir, RESULTS_JSON), payload)


def write_model_card(model_dir: str, args, result: Dict) -> None:
    lines = [f'# {args.pipeline} / {result["stage"]}', '',
             f'Multi-label text classifier ({", ".join(args.label_columns)}) made by research_main.py '
             f'(pipeline `{args.pipeline}`, stage `{result["stage"]}`) for {args.author_name}.', '',
             f'Teacher: `{args.teacher_checkpoint or args.teacher_path}`. Data: `{args.dataset_path}`.', '',
             '| metric | value |', '|---|---|']
    for key in ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'roc_auc_macro', 'size_mb', 'params_nonzero',
                'sparsity_overall', 'latency_ms_p50'):
        lines.append(f'| {key} | {result.get(key)} |')
    lines += ['', 'Load it:', '', '```python', 'from research_inference import load_compressed_model',
              f"model = load_compressed_model('{model_dir}')", "model.predict(['...'])", '```', '']
    with open(os.path.join(model_dir, 'README.md'), 'w', encoding='utf-8') as fh:
        fh.write('\n'.join(lines))


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

def run_pipeline(args) -> List[Dict]:
    from transformers import set_seed
    from research_data import positive_class_weights, prepare_data, tokenized_splits
    from research_inference import save_hf_classifier
    from research_kd import check_kd_method, distill_student
    from research_pruning import check_prune_method, prune_and_fine_tune, selected_weight_names
    from research_quantization import check_quant_method, quantize_and_save

    # Fail fast on a method that cannot run, before any training.
    if args.enable_kd:
        check_kd_method(args.kd_method)
    if args.enable_pruning:
        check_prune_method(args.prune_method)
    if args.enable_quantization:
        check_quant_method(args.quant_method, args.quant_dtype)

    set_seed(args.seed)
    data = prepare_data(args.dataset_path, args.text_column, args.label_columns, args.num_folds, args.eval_fold,
                        args.data_fraction, args.val_fraction, args.seed)
    pos_weight = positive_class_weights(data.labels[data.train_idx])
    plan = planned_stages(args)
    stages: List[Dict] = []
    work = os.path.join(args.output_dir, 'work')

    def record(stage, model, tokenizer, splits, extra=None, saved_info=None):
        """Save the stage (unless the quantizer already did), evaluate it from disk, keep or drop it."""
        path = stage_dir(args, stage)
        info = stage_info(args, stage)
        if saved_info is None:
            save_hf_classifier(model, tokenizer, path, info)
        else:
            from research_inference import write_info
            write_info(path, {**info, **saved_info})
        result = evaluate_stage(args, stage, path, selected_weight_names(model, args.prune_layers), splits.test, extra)
        keep = args.save_all_stages or stage == plan[-1]
        result['model_dir'] = os.path.abspath(path) if keep else None
        if keep:
            write_model_card(path, args, result)
        else:
            shutil.rmtree(path, ignore_errors=True)
        stages.append(result)

    # Teacher (baseline)
    teacher, teacher_tokenizer = obtain_teacher(args, data)
    teacher_splits = tokenized_splits(data, teacher_tokenizer, args.max_length, args.cache_dir)
    record('baseline', teacher, teacher_tokenizer, teacher_splits)
    model, tokenizer, splits = teacher, teacher_tokenizer, teacher_splits

    # Knowledge distillation: the student replaces the teacher for every later stage
    if args.enable_kd:
        from research_inference import TorchClassifier
        student, student_tokenizer = build_student(args, teacher, teacher_tokenizer)
        student_splits = tokenized_splits(data, student_tokenizer, args.max_length, args.cache_dir)
        teacher_classifier = TorchClassifier(teacher, teacher_tokenizer, args.label_columns, args.max_length, args.threshold, {})
        model = distill_student(student, student_tokenizer, student_splits, teacher_classifier, teacher_splits.train,
                                pos_weight, args, os.path.join(work, 'kd'))
        tokenizer, splits = student_tokenizer, student_splits
        record('kd', model, tokenizer, splits)

    # Pruning (+ fine-tuning with masks held)
    if args.enable_pruning:
        model, report = prune_and_fine_tune(model, tokenizer, splits, pos_weight, args, os.path.join(work, 'prune'))
        record('prune', model, tokenizer, splits, extra=report)

    # Quantization: the quantizer writes its own artifact
    if args.enable_quantization:
        saved = quantize_and_save(model, tokenizer, stage_dir(args, 'quant'), args, splits.train, splits.val, pos_weight)
        record('quant', model, tokenizer, splits, saved_info=saved)

    shutil.rmtree(work, ignore_errors=True)
    return stages, data


def main(args_list: Optional[List[str]] = None) -> int:
    try:
        args = parse_compression_arguments(args_list)
        args.tool = TOOL_MARKER
        prepare_output_dir(args)
        print_compression_config(args)
        save_config(args, os.path.join(args.output_dir, CONFIG_JSON))
        started = time.time()
        from research_eval import add_relative_metrics, format_stage_table
        stages, data = run_pipeline(args)
        stages = add_relative_metrics(stages)
        write_results(args, stages, data)
        print('\n' + format_stage_table(stages))
        print(f'\n[done] {args.pipeline} in {time.time() - started:.0f} s; results in '
              f'{os.path.join(args.output_dir, RESULTS_JSON)}')
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(main())
