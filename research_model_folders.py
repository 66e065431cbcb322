"""Every local model folder a run uses (--teacher_path, --teacher_checkpoint, --student_path), opened and
checked before any work: its config reads, its weights are whole (every tensor's bytes lie inside the file),
its tokenizer loads with a real vocabulary (without tokenizer files `AutoTokenizer` silently builds a
5-token tokenizer that reads every text as `[UNK]`), and a fine-tuned checkpoint predicts the run's labels
with a trained head. A problem is a UsageError naming the flag, the file and the fix, raised while nothing
has moved or trained.

A hub id is not opened here (it may not be fetchable now): the stage that loads it says why it cannot.
"""

import functools
import json
import os
from typing import List, Sequence, Tuple

import torch

from research_errors import UsageError
from research_models import (HEAD_MODULES, check_checkpoint_labels, folder_fingerprint, load_model_config,
                             load_tokenizer, resolve_model_path)

SAFETENSORS_DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'I16': 2, 'U16': 2, 'F16': 2,
                           'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
SHARD_INDEXES = {'model.safetensors.index.json': 'model.safetensors', 'pytorch_model.bin.index.json': 'pytorch_model.bin'}
MIN_VOCAB_SHARE = 0.5   # a tokenizer with fewer tokens than half the model's embedding rows is not the model's


def local_model_folder(path: str):
    """The folder `path` names (a packaged model resolved), or None for a hub id."""
    folder = resolve_model_path(path) if path else None
    return folder if folder and os.path.isdir(folder) else None


DEFAULT_FIX = ('A model folder needs config.json, whole weights (model.safetensors or pytorch_model.bin) and its '
               'tokenizer files, as save_pretrained writes them: copy or download the folder again, or pass another one.')


def refuse(flag: str, path: str, problem: str, fix: str = DEFAULT_FIX) -> UsageError:
    return UsageError(f"{flag} '{path}' {problem}. {fix}")


# ---------------------------------------------------------------------------------------------
# Weights: whole to their last byte
# ---------------------------------------------------------------------------------------------

def safetensors_tensor_names(path: str) -> List[str]:
    """The tensor names of a safetensors file, after checking that its header parses and that every tensor's
    bytes (dtype x shape) lie inside the file; raises ValueError saying what is wrong."""
    size = os.path.getsize(path)
    with open(path, 'rb') as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f'is {size} bytes long, shorter than a safetensors header')
        length = int.from_bytes(head, 'little')
        if 8 + length > size:
            raise ValueError(f'is cut short: its header alone needs {8 + length} bytes, the file has {size}')
        header = json.loads(fh.read(length))
    data = size - 8 - length
    names = []
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        begin, end = entry['data_offsets']
        count = 1
        for dim in entry['shape']:
            count *= dim
        expected = count * SAFETENSORS_DTYPE_BYTES.get(entry['dtype'], 0)
        if end > data:
            raise ValueError(f'is cut short: tensor {name} ends at byte {8 + length + end}, the file has {size}')
        if entry['dtype'] in SAFETENSORS_DTYPE_BYTES and end - begin != expected:
            raise ValueError(f'holds {end - begin} bytes for tensor {name}, whose {entry["dtype"]} shape '
                             f'{entry["shape"]} needs {expected}')
        names.append(name)
    return names


def torch_tensor_names(path: str) -> List[str]:
    """The tensor names of a torch.save file (read through, without running code)."""
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    return list(state) if isinstance(state, dict) else []


def weight_files(folder: str) -> List[str]:
    """The weight files of a model folder: a single file, or every shard an index names."""
    for index in SHARD_INDEXES:
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index), encoding='utf-8') as fh:
                return sorted(set(json.load(fh)['weight_map'].values()))
    return [name for name in SHARD_INDEXES.values() if os.path.isfile(os.path.join(folder, name))][:1]


def stored_tensor_names(flag: str, path: str, folder: str) -> List[str]:
    """Every tensor name stored in the folder's weights, each file checked to its end."""
    try:
        files = weight_files(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(flag, path, f'has a shard index that cannot be read ({type(exc).__name__})')
    if not files:
        raise refuse(flag, path, f'has no weights ({" or ".join(SHARD_INDEXES.values())})')
    names = []
    for name in files:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise refuse(flag, path, f'lacks the weight file {name} that its shard index names')
        try:
            names += safetensors_tensor_names(file) if name.endswith('.safetensors') else torch_tensor_names(file)
        except ValueError as exc:
            if str(exc).startswith(('is ', 'holds ')):
                raise refuse(flag, path, f'has weights that cannot be read: {name} {exc}')
            raise refuse(flag, path, f'has weights that cannot be read: {name} ({type(exc).__name__}: '
                                     f'{str(exc).splitlines()[0] if str(exc) else "damaged"})')
        except (OSError, RuntimeError, KeyError, TypeError, EOFError) as exc:
            raise refuse(flag, path, f'has weights that cannot be read: {name} ({type(exc).__name__}: '
                                     f'{str(exc).splitlines()[0] if str(exc) else "damaged"})')
    return names


# ---------------------------------------------------------------------------------------------
# Config, tokenizer, and the folder as a whole
# ---------------------------------------------------------------------------------------------

def check_config(flag: str, path: str, folder: str):
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise refuse(flag, path, 'has no config.json')
    try:
        return load_model_config(folder)
    except UsageError as exc:
        raise refuse(flag, path, f'has a config.json that cannot be read ({str(exc).split("(", 1)[-1].split(")")[0]})')


def check_tokenizer(flag: str, path: str, folder: str, config) -> None:
    """The tokenizer loads and has a real vocabulary: more tokens than its special ones, and not far fewer
    than the model has embedding rows (a fallback tokenizer built from the config alone has 5)."""
    try:
        tokenizer = load_tokenizer(folder)
    except UsageError as exc:
        raise refuse(flag, path, f'has a tokenizer that cannot be loaded ({str(exc).split("(", 1)[-1].split(")")[0]})')
    size = len(tokenizer)
    ordinary = size - len(set(tokenizer.all_special_ids))
    rows = getattr(config, 'vocab_size', None)
    if ordinary < 1 or (isinstance(rows, int) and size < MIN_VOCAB_SHARE * rows):
        raise refuse(flag, path, f'has no usable tokenizer: it loads with {size} tokens ({ordinary} besides the special '
                                 f'ones) for a model with {rows} embedding rows, so every text would become the unknown '
                                 'token (its tokenizer files, e.g. tokenizer.json or vocab.txt, are missing)',
                     'Copy the tokenizer files of the model into the folder (tokenizer.save_pretrained(folder)), '
                     'or pass a complete model folder.')


@functools.lru_cache(maxsize=None)
def _checked_folder(flag: str, path: str, folder: str, fingerprint: str) -> Tuple[object, Tuple[str, ...]]:
    config = check_config(flag, path, folder)
    names = tuple(stored_tensor_names(flag, path, folder))
    check_tokenizer(flag, path, folder, config)
    return config, names


def check_model_folder(path: str, flag: str) -> None:
    """Open a local model folder given with `flag` and refuse it unless its config, weights (whole) and
    tokenizer all load; checked once per folder content in a process. A hub id is left alone."""
    folder = local_model_folder(path)
    if folder is not None:
        _checked_folder(flag, path, folder, folder_fingerprint(folder))


def untrained_head(config, names: Sequence[str]) -> List[str]:
    """The head tensors a classifier of this config has but the stored weights lack (the model built on the
    meta device: no memory, no weights)."""
    from transformers import AutoModelForSequenceClassification
    try:
        with torch.device('meta'):
            model = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return []            # a model class this check cannot build: the load reports a missing head
    stored = set(names)
    return sorted(k for k in model.state_dict() if k.split('.')[0] in HEAD_MODULES and k not in stored)


def check_checkpoint_folder(path: str, label_names: Sequence[str]) -> None:
    """--teacher_checkpoint, besides a whole model folder: a trained classification head, predicting the
    run's labels in the run's order."""
    folder = local_model_folder(path)
    if folder is None:
        return
    config, names = _checked_folder('--teacher_checkpoint', path, folder, folder_fingerprint(folder))
    missing = untrained_head(config, names)
    if missing:
        raise refuse('--teacher_checkpoint', path, f'has no trained classification head (missing: {", ".join(missing)})',
                     'Pass a fine-tuned classifier folder (e.g. the stages/baseline folder of an earlier run), or drop '
                     '--teacher_checkpoint and give the encoder as --teacher_path to fine-tune it.')
    check_checkpoint_labels(path, config, label_names)
