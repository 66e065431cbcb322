"""Model cards: the README.md of every exported model, with Hugging Face metadata (language, license, library,
tags for the techniques that made it, base model, dataset, model-index with the test-split results), how it was
made, its metrics and how to load it with the libraries its format allows.
"""

import math
import os
from typing import Dict, List, Optional, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load

from research_compression_config import PIPELINE_CONFIGS, STAGES, TRAINING_READS, identity_fields, settings_from_record
from research_inference import read_info
from research_models import hub_model_id
from research_stat_tables import card_statistics_lines
from research_stats import with_interval


# results key -> (metric type, its config, its name) of the model-index (Hugging Face eval results)
CARD_METRICS = {
    'f1_macro': ('f1', 'macro', 'F1 (macro)'),
    'f1_micro': ('f1', 'micro', 'F1 (micro)'),
    'f1_weighted': ('f1', 'weighted', 'F1 (weighted)'),
    'exact_match': ('exact_match', None, 'Exact match (every label right)'),
    'hamming_loss': ('hamming_loss', None, 'Hamming loss'),
    'roc_auc_macro': ('roc_auc', 'macro', 'ROC-AUC (macro)'),
}
# compression_info.json format -> the card's library_name (None: only this tool's loader reads the folder)
CARD_LIBRARY = {'hf': 'transformers', 'hf_bnb4': 'transformers', 'onnx': 'onnx'}


def stage_kinds_so_far(pipeline: str, stage_name: str) -> List[str]:
    """The stage kinds that made this stage's model: its pipeline's chain up to and including it."""
    chain = PIPELINE_CONFIGS[pipeline].chain
    return list(chain[:[STAGES[kind].name for kind in chain].index(stage_name) + 1])


def base_model_of(kinds: Sequence[str], settings: Dict) -> Optional[str]:
    """The hub model this one was made from: the --student_path of a hub student, else the teacher (a hub
    --teacher_checkpoint, the base model named by a local checkpoint's card, or --teacher_path); None if local."""
    if 'kd' in kinds and not settings.get('student_layers'):
        return hub_model_id(settings.get('student_path'))
    checkpoint = settings.get('teacher_checkpoint')
    if checkpoint:
        card = os.path.join(checkpoint, 'README.md')
        named = (metadata_load(card) or {}).get('base_model') if os.path.isfile(card) else None
        return hub_model_id(checkpoint) or named
    return hub_model_id(settings.get('teacher_path'))


def card_eval_results(result: Dict, settings: Dict, info: Dict) -> List[EvalResult]:
    """The test-split metrics of results_final.json as Hugging Face eval results (finite values only)."""
    dataset_id = settings.get('hub_dataset_id')
    split = info.get('split') or {}
    common = dict(task_type='text-classification', task_name='Multi-label text classification',
                  dataset_type=dataset_id or 'csv', dataset_name=dataset_id or os.path.basename(settings['dataset_path']),
                  dataset_split='test',
                  dataset_args={k: split[k] for k in ('num_folds', 'fold', 'seed', 'data_fraction', 'test_split_hash')
                                if k in split} or None)
    values = [(key, kind, config, name, result.get(key)) for key, (kind, config, name) in CARD_METRICS.items()]
    values += [(f'{label}_f1', 'f1', label, f'F1 ({label})', m['f1']) for label, m in result['per_label'].items()]
    return [EvalResult(metric_type=kind, metric_config=config, metric_name=name, metric_value=value, **common)
            for _, kind, config, name, value in values
            if isinstance(value, (int, float)) and math.isfinite(value)]


def card_metadata(pipeline: str, result: Dict, settings: Dict, info: Dict) -> ModelCardData:
    """Hugging Face model-card metadata: language, license, library, task, tags (the techniques that made this
    stage), base model, dataset, metrics and the model-index with the test-split results."""
    kinds = stage_kinds_so_far(pipeline, result['stage'])
    tags = ['text-classification', 'multi-label-classification', 'model-compression']
    if 'kd' in kinds:
        tags += ['knowledge-distillation', f'kd-{settings["kd_method"]}']
    if 'prune' in kinds:
        tags += ['pruning', f'{settings["prune_method"]}-pruning']
    if 'quant' in kinds:
        tags += ['quantization', f'{info.get("quant_method", settings["quant_method"])}-quantization']
        tags += [info['weight_dtype']] if info.get('weight_dtype') else []
    if info.get('format') == 'onnx':
        tags += ['onnx', 'onnxruntime']
    library = CARD_LIBRARY.get(info.get('format'))
    if info.get('format') == 'hf_structured' and info.get('loads_with_from_pretrained'):
        library = 'transformers'
    language = settings.get('language') or []
    return ModelCardData(
        language=list(language) if len(language) != 1 else language[0],
        license=settings.get('model_license'), library_name=library, pipeline_tag='text-classification', tags=tags,
        base_model=base_model_of(kinds, settings), datasets=[settings['hub_dataset_id']] if settings.get('hub_dataset_id') else None,
        metrics=sorted({kind for kind, _, _ in CARD_METRICS.values()}),
        model_name=f'{pipeline}-{result["stage"]}', eval_results=card_eval_results(result, settings, info))


def usage_snippet(model_dir: str, info: Dict) -> List[str]:
    """Markdown lines that load the folder with the libraries its format allows."""
    lines = ['```python', 'from research_inference import load_compressed_model  # this repository',
             f"model = load_compressed_model('{model_dir}')", "model.predict(['...'])  # [{label: probability}]", '```', '']
    fmt, max_length = info.get('format'), info.get('max_length', 128)
    if fmt in ('hf', 'hf_bnb4') or (fmt == 'hf_structured' and info.get('loads_with_from_pretrained')):
        lines += ['With `transformers` alone (config.json says `problem_type: multi_label_classification`, so the pipeline '
                  'applies a sigmoid per label):', '', '```python', 'from transformers import pipeline',
                  f"classifier = pipeline('text-classification', model='{model_dir}', top_k=None)",
                  f"classifier(['...'], truncation=True, max_length={max_length})  # [[{{'label': ..., 'score': ...}}, ...]]",
                  '```', '']
    elif fmt == 'onnx':
        lines += ['With `onnxruntime` and a `transformers` tokenizer alone:', '', '```python', ONNX_SNIPPET.format(
            folder=model_dir, max_length=max_length).strip(), '```', '']
    return lines


ONNX_SNIPPET = """
import numpy as np
import onnxruntime as ort
from transformers import AutoConfig, AutoTokenizer

folder = '{folder}'
tokenizer = AutoTokenizer.from_pretrained(folder)
labels = AutoConfig.from_pretrained(folder).id2label
session = ort.InferenceSession(f'{{folder}}/model.onnx', providers=['CPUExecutionProvider'])
batch = tokenizer(['...'], padding=True, truncation=True, max_length={max_length}, return_tensors='np')
logits = session.run(None, {{i.name: batch[i.name] for i in session.get_inputs()}})[0]
probs = 1 / (1 + np.exp(-logits))  # multi-label: one sigmoid per label
print([{{labels[j]: float(p) for j, p in enumerate(row)}} for row in probs])
"""


def model_card(model_dir: str, pipeline: str, result: Dict, config: Dict) -> str:
    """README.md for a saved model: Hugging Face metadata (front matter), then what it is, how it was made, its
    metrics and how to load it."""
    info = read_info(model_dir)
    config = {**config, **PIPELINE_CONFIGS[pipeline].overrides}
    kinds = stage_kinds_so_far(pipeline, result['stage'])
    settings = {'teacher': config.get('teacher_checkpoint') or config.get('teacher_path')}
    made_with = settings_from_record(config)
    for kind in kinds[1:]:   # each technique's own settings (those every training stage reads are left out)
        settings.update({k: config.get(k) for k in identity_fields(made_with, kind) if k not in TRAINING_READS})
    lines = [f'# {pipeline}: {result["stage"]} model', '',
             f'A multi-label text classifier ({", ".join(config["label_columns"])}; sigmoid outputs, threshold '
             f'{config.get("threshold", 0.5)}) produced by the `{pipeline}` pipeline of this tool '
             f'(stage `{result["stage"]}`), for {config.get("author_name")}.', '',
             '## How it was made', '', f'Data: `{config.get("dataset_path")}` (max_length {config.get("max_length")}, '
             f'seed {config.get("seed")}).', '']
    lines += [f'- {k}: `{v}`' for k, v in settings.items() if v is not None]
    lines += ['', '## Metrics (test split)', ''] + card_statistics_lines(result) + ['', '| metric | value |', '|---|---|']
    for key in ('f1_macro', 'f1_micro', 'f1_weighted', 'exact_match', 'hamming_loss', 'roc_auc_macro', 'size_mb',
                'size_mb_compressed', 'params_total', 'params_nonzero', 'sparsity_pruned_layers', 'sparsity_overall',
                'vocab_size', 'latency_ms_p50', 'latency_ms_p95', 'compression_ratio', 'speedup', 'speedup_ci_low',
                'speedup_ci_high', 'speedup_iqr'):
        value = result.get(key)
        if f'{key}_ci_low' in result:
            lines.append(f'| {key} | {with_interval(value, result[f"{key}_ci_low"], result[f"{key}_ci_high"])} |')
        else:
            lines.append(f'| {key} | {value:.4g} |' if isinstance(value, float) else f'| {key} | {value} |')
    lines += ['', '| label | threshold | precision | recall | F1 [95% CI] | ROC-AUC |', '|---|---|---|---|---|---|']
    thresholds = result.get('thresholds') or {}
    for label, m in result['per_label'].items():
        auc = '-' if m['roc_auc'] is None else f'{m["roc_auc"]:.3f}'
        cut = f'{thresholds[label]:.3f}' if label in thresholds else '-'
        f1 = with_interval(m['f1'], m.get('f1_ci_low'), m.get('f1_ci_high'), '.3f')
        lines.append(f'| {label} | {cut} | {m["precision"]:.3f} | {m["recall"]:.3f} | {f1} | {auc} |')
    lines += ['', f'Latency: batch {result.get("latency_batch_size")} x {result.get("latency_seq_len")} tokens on '
              f'{result.get("latency_device")}.', '', '## Load it', '']
    lines += usage_snippet(model_dir, info)
    metadata = card_metadata(pipeline, result, config, info)
    return f'---\n{metadata.to_yaml()}\n---\n\n' + '\n'.join(lines)


def write_model_card(model_dir: str, pipeline: str, result: Dict, config: Dict) -> None:
    ModelCard(model_card(model_dir, pipeline, result, config)).save(os.path.join(model_dir, 'README.md'))
