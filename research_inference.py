"""Load any saved stage folder (fp32, pruned or quantized) and predict label probabilities.

    from research_inference import load_compressed_model
    model = load_compressed_model('compressed_models/stages/quant')
    model.predict(['...'])  # -> [{'bully': 0.91, 'sexual': 0.02, ...}]

CLI (research_scoring): python research_inference.py predict MODEL_DIR "text" ["text" ...]   (or without `predict`)
                       python research_inference.py score MODEL_DIR --input comments.csv --output predictions.csv

This module owns every on-disk format of a stage model: `FORMATS` is one static table, name -> (save,
load), and `compression_info.json` (written here only) names the format of a folder:

| format        | what the folder holds                                         | runs on              |
|---------------|---------------------------------------------------------------|----------------------|
| hf            | `save_pretrained` safetensors (fp32, or fp16/bf16)            | PyTorch, any device  |
| hf_structured | the same, matrices physically shrunk (shapes in config.json)  | PyTorch, any device  |
| onnx          | `model.onnx` (int8 / int4 ONNX Runtime graph) + config, tokenizer | ONNX Runtime, CPU |
| hf_bnb4       | bitsandbytes NF4/FP4 packed weights                           | PyTorch, CUDA only   |
"""

import hashlib
import json
import os
import sys
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from research_errors import UsageError
from research_files import atomic_write, file_is_whole
from research_latency import onnxruntime_session_options
from research_models import build_structurally_pruned_model, is_structurally_pruned, model_inputs
from research_scoring import parse_inference_arguments, score_command

INFO_FILE = 'compression_info.json'
ONNX_FILE = 'model.onnx'


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Per-label probability of a multi-label logit."""
    return 1.0 / (1.0 + np.exp(-x))


class CompressedClassifier:
    """A multi-label text classifier as saved by this tool. Subclasses provide `logits` and weights."""

    device_name = 'cpu'

    def __init__(self, tokenizer, label_names: Sequence[str], max_length: int, threshold: float, info: dict):
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_length = max_length
        self.threshold = threshold
        self.info = info
        # {label: threshold}: per-label thresholds tuned on validation (--threshold_strategy per_label), stored in
        # compression_info.json as `thresholds`; otherwise `threshold` for every label
        stored = info.get('thresholds') or {}
        self.thresholds = {name: float(stored.get(name, threshold)) for name in self.label_names}

    def logits(self, batch: dict) -> np.ndarray:
        raise NotImplementedError

    def set_threads(self, n: int) -> 'CompressedClassifier':
        """Intra-op threads to run with. A no-op for PyTorch, which reads its process-wide count at every call:
        time it inside research_latency.intra_op_threads(n). ONNX sessions override this."""
        return self

    def to(self, device) -> 'CompressedClassifier':
        """Run on `device`. Only PyTorch models move; an ONNX model runs on the CPU with ONNX Runtime."""
        if torch.device(device).type != 'cpu':
            raise UsageError(f"This is an ONNX model ({self.info.get('weight_dtype', '')}); it runs on the CPU with "
                             f'ONNX Runtime, not on {device}. Load it without a device, or quantize with '
                             '--quant_method fp16 (or int4 --quant_dtype nf4) for a GPU model.')
        return self

    def parameter_arrays(self) -> Dict[str, np.ndarray]:
        """Every stored parameter as an array, keyed by the PyTorch parameter name where one is known."""
        raise NotImplementedError

    def probabilities(self, batch: dict) -> np.ndarray:
        """[batch, labels] sigmoid probabilities of a padded batch."""
        return sigmoid(self.logits(batch))

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> List[Dict[str, float]]:
        if isinstance(texts, str):
            texts = [texts]
        results = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors='pt')
            probs = sigmoid(self.logits(dict(batch)))
            results.extend({name: float(p) for name, p in zip(self.label_names, row)} for row in probs)
        return results

    def predict_labels(self, texts: Sequence[str], batch_size: int = 32) -> List[List[str]]:
        """Per text, the labels whose probability reaches that label's stored threshold (`thresholds`)."""
        return [self.labels_of(probs) for probs in self.predict(texts, batch_size)]

    def labels_of(self, probs: Dict[str, float]) -> List[str]:
        return [name for name, p in probs.items() if p >= self.thresholds[name]]


class TorchClassifier(CompressedClassifier):
    """A PyTorch `nn.Module` classifier (fp32, pruned, or quantized in PyTorch)."""

    def __init__(self, model, tokenizer, label_names, max_length, threshold, info):
        super().__init__(tokenizer, label_names, max_length, threshold, info)
        self.model = model.eval()
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else 'cpu'
        self.device_name = str(self.device)

    def to(self, device) -> 'TorchClassifier':
        """Move the model to `device` ('cpu', 'cuda', 'cuda:1', ...), keeping its stored precision."""
        if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
            raise UsageError(f'--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False); '
                             'use the default CPU.')
        self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.device_name = str(self.device)
        return self

    def logits(self, batch: dict) -> np.ndarray:
        with torch.inference_mode():
            return self.model(**model_inputs(batch, self.device)).logits.float().cpu().numpy()

    def parameter_arrays(self) -> Dict[str, np.ndarray]:
        return {name: tensor.detach().float().cpu().numpy() for name, tensor in self.model.state_dict().items()
                if tensor.is_floating_point() and not name.endswith(('_mask', 'position_ids'))}


class OnnxClassifier(CompressedClassifier):
    """An ONNX Runtime session (e.g. an int8-quantized export)."""

    def __init__(self, model_path, tokenizer, label_names, max_length, threshold, info, threads: Optional[int] = None):
        super().__init__(tokenizer, label_names, max_length, threshold, info)
        self.model_path = model_path
        self.set_threads(threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.device_name = 'cpu (onnxruntime)'

    def set_threads(self, n: Optional[int]) -> 'OnnxClassifier':
        """(Re-)create the session with `n` intra-op threads, one inter-op thread, sequential execution
        (research_latency.onnxruntime_session_options); None gives ONNX Runtime's defaults."""
        import onnxruntime as ort
        options = None if n is None else onnxruntime_session_options(n)
        self.session = ort.InferenceSession(self.model_path, sess_options=options, providers=['CPUExecutionProvider'])
        return self

    def logits(self, batch: dict) -> np.ndarray:
        ids = batch['input_ids']
        feeds = {}
        for name in self.input_names:
            # Tokenizers that do not emit token_type_ids mean segment 0 everywhere.
            value = batch[name] if name in batch else np.zeros(tuple(ids.shape), dtype=np.int64)
            feeds[name] = np.asarray(value.cpu().numpy() if hasattr(value, 'cpu') else value, dtype=np.int64)
        return self.session.run(None, feeds)[0]

    def parameter_arrays(self) -> Dict[str, np.ndarray]:
        """Stored initializers, renamed to PyTorch parameter names through the map written at export.
        Quantization scales and zero points are bookkeeping, not parameters, and are left out."""
        import onnx
        from onnx import numpy_helper
        graph = onnx.load(self.model_path).graph
        names = self.info.get('onnx_weight_names', {})
        packed_k = {node.input[1]: onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == 'K'))
                    for node in graph.node if node.op_type == 'MatMulNBits'}
        arrays = {}
        for init in graph.initializer:
            if init.name.endswith(('_scale', '_zero_point', '_scales', '_zero_points')):
                continue
            array = numpy_helper.to_array(init)
            if init.name in packed_k:
                array = unpack_matmul_nbits_codes(array, packed_k[init.name])
            elif init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                array = array.astype(np.int8)
            base = init.name
            for suffix in ('_quantized', '_Q4'):
                base = base[:-len(suffix)] if base.endswith(suffix) else base
            arrays[names.get(base, init.name)] = array
        return arrays


def unpack_matmul_nbits_codes(packed: np.ndarray, k: int) -> np.ndarray:
    """Signed 4-bit codes [N, K] of an ONNX Runtime MatMulNBits weight stored as uint8 [N, blocks, bytes]
    (two codes per byte, low nibble first, symmetric offset 8): a stored 0 is a weight of exactly 0."""
    rows = packed.reshape(packed.shape[0], -1)
    codes = np.stack([rows & 0x0F, rows >> 4], axis=-1).reshape(packed.shape[0], -1)[:, :k]
    return codes.astype(np.int8) - 8


def kept_stages_hint(model_dir: str) -> str:
    """What to pass instead: a run keeps only its final stage unless --save_all_stages, so a missing
    `stages/kd` usually means the run never saved it."""
    stages = os.path.dirname(os.path.abspath(model_dir.rstrip('/')))
    kept = sorted(n for n in os.listdir(stages) if os.path.isfile(os.path.join(stages, n, INFO_FILE))) \
        if os.path.basename(stages) == 'stages' and os.path.isdir(stages) else []
    if kept and not os.path.exists(model_dir):
        return (f"That run kept only {', '.join(kept)} in {stages}: a run saves its final stage alone unless run with "
                '--save_all_stages (re-running with it reuses every stored stage, nothing trains again).')
    return 'Pass a stage folder such as <output_dir>/stages/quant.'


def read_info(model_dir: str) -> dict:
    """The folder's compression_info.json, refused by name when it is missing, damaged or lacks what loading needs."""
    path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"'{model_dir}' is not a model folder saved by this tool (no {INFO_FILE}). "
                         + kept_stages_hint(model_dir))
    try:
        with open(path, encoding='utf-8') as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"'{path}' cannot be read ({type(exc).__name__}: {exc}): the file is damaged or was cut "
                         f'short. {REFETCH_FIX}') from exc
    missing = [k for k in ('format', 'label_names', 'max_length') if not isinstance(info, dict) or k not in info]
    if missing:
        raise UsageError(f"'{path}' lacks {', '.join(missing)} (it is damaged, or not written by this tool). {REFETCH_FIX}")
    return info


REFETCH_FIX = ('Copy the model folder again from where it was made, or export it again (research_main.py writes every '
               'final stage to <output_dir>/stages/<stage>/).')


def load_problem(model_dir: str, exc: Exception) -> Optional[UsageError]:
    """A folder whose files cannot be loaded (cut short, damaged) as a refusal naming the file; None when
    `exc` is no such failure (a bug keeps its traceback)."""
    files = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, n)))
    damaged = [f for f in files if not file_is_whole(f)]
    from_loader = isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith(('onnxruntime', 'safetensors',
                                                                                             'google.protobuf', 'onnx'))
    if not damaged and not from_loader:
        return None
    if not damaged and type(exc).__module__.startswith('onnxruntime'):
        damaged = [f for f in files if f.endswith('.onnx')]
    named = ', '.join(f"'{f}'" for f in damaged) or f"a file of '{model_dir}'"
    first_line = (str(exc).strip().splitlines() or [''])[0][:200]
    return UsageError(f'{named} cannot be loaded ({type(exc).__name__}: {first_line}): it is damaged or was cut short. '
                      f'{REFETCH_FIX}')


def _write_info(model_dir: str, info: dict) -> None:
    """compression_info.json: written aside and renamed (never through an existing file, which may be shared)."""
    with atomic_write(os.path.join(model_dir, INFO_FILE)) as fh:
        json.dump(info, fh, indent=2)


def set_threshold(model_dir: str, threshold: float, thresholds: Optional[Dict[str, float]] = None) -> None:
    """The decision threshold the folder's model predicts labels at (an exported model carries its run's), and
    its per-label `thresholds` ({label: value}, tuned on validation) when there are some (else none is kept)."""
    info = {k: v for k, v in read_info(model_dir).items() if k != 'thresholds'}
    _write_info(model_dir, {**info, 'threshold': threshold, **({'thresholds': dict(thresholds)} if thresholds else {})})


# ---------------------------------------------------------------------------------------------
# ONNX export (the int8/int4 formats start from it; evaluation times the fp32 export as a reference)
# ---------------------------------------------------------------------------------------------

ONNX_OPSET = 17


def _array_key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def export_to_onnx(model, tokenizer, onnx_path: str, max_length: int) -> Dict[str, str]:
    """Export a PyTorch sequence classifier to ONNX (dynamic batch and sequence axes). Returns a map from
    ONNX initializer name to PyTorch parameter name, found by matching values (a Linear weight is stored
    transposed for MatMul), so sparsity can later be counted per layer from the saved file."""
    import onnx
    from onnx import numpy_helper
    model = model.eval().cpu()
    sample = tokenizer(['sample text'] * 2, padding='max_length', max_length=min(max_length, 16), truncation=True,
                       return_tensors='pt')
    names = ['input_ids', 'attention_mask'] + (['token_type_ids'] if 'token_type_ids' in sample else [])
    axes = {name: {0: 'batch', 1: 'sequence'} for name in names}
    axes['logits'] = {0: 'batch'}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is the one that handles HF encoders without extra packages;
        # its deprecation notice concerns the exporter, not the exported file.
        warnings.simplefilter('ignore')
        torch.onnx.export(model, tuple(sample[n] for n in names), onnx_path, input_names=names, output_names=['logits'],
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    by_value = {}
    for name, param in model.state_dict().items():
        if param.is_floating_point() and param.dim() >= 1:
            array = param.detach().cpu().float().numpy()
            by_value.setdefault(_array_key(array), name)
            if array.ndim == 2:
                by_value.setdefault(_array_key(array.T), name)
    mapping = {}
    for init in onnx.load(onnx_path).graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            key = _array_key(array)
            if key in by_value:
                mapping[init.name] = by_value[key]
    return mapping


# ---------------------------------------------------------------------------------------------
# Formats: save(model_dir, model, tokenizer, info) and load(model_dir, info) -> CompressedClassifier
# ---------------------------------------------------------------------------------------------

def save_hf(model_dir: str, model, tokenizer, info: dict) -> dict:
    """Hugging Face `save_pretrained` format (safetensors), loadable with `from_pretrained` too; a
    structurally pruned model is marked `hf_structured` (its per-layer shapes are in config.json)."""
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    if is_structurally_pruned(model):
        info = {**info, 'format': 'hf_structured',
                'loads_with_from_pretrained': bool(model.config.structured_pruning['loads_with_from_pretrained'])}
    else:
        info = {**info, 'format': 'hf'}
    _write_info(model_dir, info)
    return info


def save_onnx(model_dir: str, model, tokenizer, info: dict) -> dict:
    """An ONNX Runtime graph already written to `model_dir/model.onnx`, with the PyTorch model's config and
    the tokenizer beside it."""
    if not os.path.isfile(os.path.join(model_dir, ONNX_FILE)):
        raise FileNotFoundError(f'{model_dir}/{ONNX_FILE} must be written before the folder is saved')
    tokenizer.save_pretrained(model_dir)
    model.config.save_pretrained(model_dir)
    info = {**info, 'format': 'onnx', 'onnx_file': ONNX_FILE}
    _write_info(model_dir, info)
    return info


def save_bnb4(model_dir: str, model, tokenizer, info: dict) -> dict:
    """A bitsandbytes 4-bit model: `save_pretrained` stores the packed weights and their statistics."""
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    info = {**info, 'format': 'hf_bnb4'}
    _write_info(model_dir, info)
    return info


def _torch_classifier(model, model_dir: str, info: dict, cls=TorchClassifier) -> 'TorchClassifier':
    from transformers import AutoTokenizer
    return cls(model, AutoTokenizer.from_pretrained(model_dir), info['label_names'], info['max_length'],
               info.get('threshold', 0.5), info)


def load_hf(model_dir: str, info: dict) -> CompressedClassifier:
    from transformers import AutoModelForSequenceClassification
    return _torch_classifier(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir, info)


def load_hf_structured(model_dir: str, info: dict) -> CompressedClassifier:
    return _torch_classifier(build_structurally_pruned_model(model_dir), model_dir, info)


def load_onnx(model_dir: str, info: dict) -> CompressedClassifier:
    from transformers import AutoTokenizer
    return OnnxClassifier(os.path.join(model_dir, info.get('onnx_file', ONNX_FILE)), AutoTokenizer.from_pretrained(model_dir),
                          info['label_names'], info['max_length'], info.get('threshold', 0.5), info)


class BitsAndBytesClassifier(TorchClassifier):
    """A bitsandbytes NF4/FP4 model on a CUDA GPU. Its 4-bit weights are packed two per byte (uint8) with
    per-block scales, so they are unpacked to count parameters and zeros (NF4 and FP4 store 0 exactly)."""

    def to(self, device) -> 'BitsAndBytesClassifier':
        """Loaded on the current GPU already; 4-bit weights do not move, and never off the GPU."""
        if torch.device(device).type != 'cuda':
            raise UsageError('This model holds bitsandbytes 4-bit weights, which run only on a CUDA GPU.')
        return self

    def parameter_arrays(self) -> Dict[str, np.ndarray]:
        import bitsandbytes as bnb
        arrays = {}
        for module_name, module in self.model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(param, bnb.nn.Params4bit):
                    param = bnb.functional.dequantize_4bit(param.data, param.quant_state)
                arrays[f'{module_name}.{name}' if module_name else name] = param.detach().float().cpu().numpy()
        return arrays


def load_bnb4(model_dir: str, info: dict) -> CompressedClassifier:
    """A bitsandbytes NF4/FP4 model (--quant_method int4 --quant_dtype nf4|fp4): loads on a CUDA GPU only."""
    import torch
    from transformers import AutoModelForSequenceClassification
    if not torch.cuda.is_available():
        raise UsageError(f"'{model_dir}' holds {info.get('weight_dtype', '4-bit').upper()} weights of bitsandbytes, "
                         'which load and run only on a CUDA GPU (with `pip install bitsandbytes`); this machine has '
                         'none. For a CPU model, quantize with --quant_method int4 --quant_dtype int4.')
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, device_map={'': torch.cuda.current_device()})
    return _torch_classifier(model, model_dir, info, BitsAndBytesClassifier)


class StorageFormat(NamedTuple):
    save: Callable[[str, object, object, dict], dict]
    load: Callable[[str, dict], CompressedClassifier]


# compression_info.json "format" -> how such a folder is written and read
FORMATS: Dict[str, StorageFormat] = {
    'hf': StorageFormat(save_hf, load_hf),
    'hf_structured': StorageFormat(save_hf, load_hf_structured),
    'onnx': StorageFormat(save_onnx, load_onnx),
    'hf_bnb4': StorageFormat(save_bnb4, load_bnb4),
}


def load_compressed_model(path: str, device: Optional[str] = None) -> CompressedClassifier:
    """Load a saved stage folder of any format; `.predict(texts)` gives one {label: probability} per text.

    `device` puts a PyTorch model (fp32, pruned, fp16/bf16) on that device, e.g. 'cuda' for fp16 on a GPU;
    by default it stays on the CPU. ONNX models (int8, int4) run on the CPU with ONNX Runtime, and
    bitsandbytes NF4/FP4 models on the GPU they need: asking those for another device is an error."""
    info = read_info(path)
    if info.get('format') not in FORMATS:
        raise UsageError(f"'{path}' has format '{info.get('format')}', which this version cannot load "
                         f"(known: {', '.join(FORMATS)}).")
    try:
        classifier = FORMATS[info['format']].load(path, info)
    except UsageError:
        raise
    except Exception as exc:
        problem = load_problem(path, exc)
        if problem is None:
            raise
        raise problem from exc
    return classifier if device is None else classifier.to(device)


def load_trainable_model(path: str):
    """(model, tokenizer) of a saved PyTorch stage (teacher, student, pruned) that a later stage trains on."""
    classifier = load_compressed_model(path)
    if not isinstance(classifier, TorchClassifier):
        raise UsageError(f'the stage at {path} is not a PyTorch model and cannot be trained further.')
    return classifier.model, classifier.tokenizer


def peak_memory_probe(model_dir: str, batch_size: int, seq_len: int, text: str) -> Dict:
    """Run in a process that has imported the runtimes and nothing else (research_eval.measure_peak_memory):
    load the saved model, predict one batch, and return the process's peak resident memory (VmHWM, the
    kernel's record of this process's own memory map) and the part above what the process held before."""
    def status_kb(field):
        with open('/proc/self/status') as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ':'))
    runtime_kb = status_kb('VmRSS')
    classifier = load_compressed_model(model_dir)
    batch = classifier.tokenizer([text] * batch_size, padding='max_length', truncation=True, max_length=seq_len,
                                 return_tensors='pt')
    classifier.logits(dict(batch))
    peak_kb = status_kb('VmHWM')
    result = {'peak_memory_mb': peak_kb / 1024, 'peak_memory_model_mb': (peak_kb - runtime_kb) / 1024}
    if torch.cuda.is_available():
        result['peak_gpu_memory_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def main(argv=None) -> int:
    """`predict` (texts as arguments; the old form without the word too) or `score` (a file): research_scoring."""
    try:
        args = parse_inference_arguments(argv)
        if args.command == 'predict':
            model = load_compressed_model(args.model_dir, device=args.device)
            for text, probs in zip(args.texts, model.predict(args.texts)):
                print(json.dumps(prediction_record(text, probs, model.labels_of(probs)), ensure_ascii=False))
            return 0
        read_info(args.model_dir)   # not a saved model: refused before the input is read
        return score_command(args, lambda: load_compressed_model(args.model_dir, device=args.device))
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2


def prediction_record(text: str, probs: Dict[str, float], labels: Sequence[str]) -> Dict:
    """What the CLI prints for one text: its labels (at the folder's thresholds) and probabilities. An empty (or
    blank) text has nothing to classify: no labels and no probabilities, and a note saying so (training drops
    such texts too)."""
    if not text.strip():
        return {'text': text, 'labels': [], 'probabilities': {}, 'note': 'empty text: nothing to classify, no labels'}
    return {'text': text, 'labels': list(labels),
            'probabilities': {k: round(v, 4) for k, v in probs.items()}}


if __name__ == '__main__':
    sys.exit(main())
