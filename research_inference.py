"""Load any saved stage folder (fp32, pruned or quantized) and predict label probabilities.

    from research_inference import load_compressed_model
    model = load_compressed_model('compressed_models/stages/quant')
    model.predict(['...'])  # -> [{'bully': 0.91, 'sexual': 0.02, ...}]

CLI: python research_inference.py MODEL_DIR "text" ["text" ...]

Every stage folder holds `compression_info.json`, whose `format` picks the loader from `MODEL_LOADERS`.
"""

import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from research_errors import UsageError

INFO_FILE = 'compression_info.json'


def _sigmoid(x):
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

    def logits(self, batch: dict) -> np.ndarray:
        raise NotImplementedError

    def set_threads(self, n: int) -> 'CompressedClassifier':
        """Intra-op threads to run with. A no-op for PyTorch, which reads its process-wide count at every call:
        time it inside research_latency.intra_op_threads(n). ONNX sessions override this."""
        return self

    def to(self, device) -> 'CompressedClassifier':
        """Run on `device`. Only PyTorch models move; an ONNX model runs on the CPU with ONNX Runtime."""
        import torch
        if torch.device(device).type != 'cpu':
            raise UsageError(f"This is an ONNX model ({self.info.get('weight_dtype', '')}); it runs on the CPU with "
                             f'ONNX Runtime, not on {device}. Load it without a device, or quantize with '
                             '--quant_method fp16 (or int4 --quant_dtype nf4) for a GPU model.')
        return self

    def parameter_arrays(self) -> Dict[str, np.ndarray]:
        """Every stored parameter as an array, keyed by the PyTorch parameter name where one is known."""
        raise NotImplementedError

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> List[Dict[str, float]]:
        if isinstance(texts, str):
            texts = [texts]
        results = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors='pt')
            probs = _sigmoid(self.logits(dict(batch)))
            results.extend({name: float(p) for name, p in zip(self.label_names, row)} for row in probs)
        return results


class TorchClassifier(CompressedClassifier):
    """A PyTorch `nn.Module` classifier (fp32, pruned, or quantized in PyTorch)."""

    def __init__(self, model, tokenizer, label_names, max_length, threshold, info):
        super().__init__(tokenizer, label_names, max_length, threshold, info)
        self.model = model.eval()
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else 'cpu'
        self.device_name = str(self.device)

    def to(self, device) -> 'TorchClassifier':
        """Move the model to `device` ('cpu', 'cuda', 'cuda:1', ...), keeping its stored precision."""
        import torch
        if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
            raise UsageError(f'--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False); '
                             'use the default CPU.')
        self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.device_name = str(self.device)
        return self

    def logits(self, batch: dict) -> np.ndarray:
        import torch
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in ('input_ids', 'attention_mask', 'token_type_ids')}
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu().numpy()

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
        from research_latency import onnxruntime_session_options
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


def read_info(model_dir: str) -> dict:
    path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"'{model_dir}' is not a model folder saved by this tool (no {INFO_FILE}). Pass a stage folder "
                         'such as <output_dir>/stages/quant.')
    with open(path, encoding='utf-8') as fh:
        return json.load(fh)


def write_info(model_dir: str, info: dict) -> None:
    with open(os.path.join(model_dir, INFO_FILE), 'w', encoding='utf-8') as fh:
        json.dump(info, fh, indent=2)


def save_hf_classifier(model, tokenizer, model_dir: str, info: dict) -> None:
    """Hugging Face `save_pretrained` format (safetensors), loadable with `from_pretrained` too."""
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_info(model_dir, {'format': 'hf', **info})


def load_hf_classifier(model_dir: str, info: dict) -> CompressedClassifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TorchClassifier(model, tokenizer, info['label_names'], info['max_length'], info.get('threshold', 0.5), info)


def load_onnx_classifier(model_dir: str, info: dict) -> CompressedClassifier:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return OnnxClassifier(os.path.join(model_dir, info.get('onnx_file', 'model.onnx')), tokenizer, info['label_names'],
                          info['max_length'], info.get('threshold', 0.5), info)


class BitsAndBytesClassifier(TorchClassifier):
    """A bitsandbytes NF4/FP4 model on a CUDA GPU. Its 4-bit weights are packed two per byte (uint8) with
    per-block scales, so they are unpacked to count parameters and zeros (NF4 and FP4 store 0 exactly)."""

    def to(self, device) -> 'BitsAndBytesClassifier':
        """Loaded on the current GPU already; 4-bit weights do not move, and never off the GPU."""
        import torch
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


def load_bitsandbytes_4bit_classifier(model_dir: str, info: dict) -> CompressedClassifier:
    """A bitsandbytes NF4/FP4 model (--quant_method int4 --quant_dtype nf4|fp4): loads on a CUDA GPU only."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    if not torch.cuda.is_available():
        raise UsageError(f"'{model_dir}' holds {info.get('weight_dtype', '4-bit').upper()} weights of bitsandbytes, "
                         'which load and run only on a CUDA GPU (with `pip install bitsandbytes`); this machine has '
                         'none. For a CPU model, quantize with --quant_method int4 --quant_dtype int4.')
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, device_map={'': torch.cuda.current_device()})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return BitsAndBytesClassifier(model, tokenizer, info['label_names'], info['max_length'], info.get('threshold', 0.5),
                                  info)


# format name (compression_info.json "format") -> loader(model_dir, info)
MODEL_LOADERS: Dict[str, Callable[[str, dict], CompressedClassifier]] = {
    'hf': load_hf_classifier,
    'onnx': load_onnx_classifier,
    'hf_bnb4': load_bitsandbytes_4bit_classifier,
}


def register_model_loader(format_name: str, loader: Callable[[str, dict], CompressedClassifier]) -> None:
    MODEL_LOADERS[format_name] = loader


def load_compressed_model(path: str, device: Optional[str] = None) -> CompressedClassifier:
    """Load a saved stage folder of any format; `.predict(texts)` gives one {label: probability} per text.

    `device` puts a PyTorch model (fp32, pruned, fp16/bf16) on that device, e.g. 'cuda' for fp16 on a GPU;
    by default it stays on the CPU. ONNX models (int8, int4) run on the CPU with ONNX Runtime, and
    bitsandbytes NF4/FP4 models on the GPU they need: asking those for another device is an error."""
    info = read_info(path)
    # Modules that add formats register their loaders when imported.
    import research_quantization  # noqa: F401
    import research_pruning  # noqa: F401  (registers 'hf_structured', structurally pruned models)
    try:
        loader = MODEL_LOADERS[info['format']]
    except KeyError:
        raise UsageError(f"'{path}' has format '{info['format']}', which this version cannot load "
                         f"(known: {', '.join(MODEL_LOADERS)}).")
    classifier = loader(path, info)
    return classifier if device is None else classifier.to(device)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    device = None
    if len(argv) >= 2 and argv[0] == '--device':
        device, argv = argv[1], argv[2:]
    if len(argv) < 2 or argv[0] in ('-h', '--help'):
        print('usage: python research_inference.py [--device cuda] MODEL_DIR "text" ["text" ...]\n'
              'Prints one JSON object of label probabilities per text; labels at or above the threshold of the\n'
              "folder's compression_info.json (the --threshold of the run that saved it) are listed.\n"
              '--device puts a PyTorch model (fp32, pruned, fp16/bf16) on that device (default: CPU); ONNX\n'
              'models (int8, int4) run on the CPU, bitsandbytes NF4/FP4 models on the GPU.')
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    try:
        model = load_compressed_model(argv[0], device=device)
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    for text, probs in zip(argv[1:], model.predict(argv[1:])):
        flagged = [name for name, p in probs.items() if p >= model.threshold]
        print(json.dumps({'text': text, 'labels': flagged, 'probabilities': {k: round(v, 4) for k, v in probs.items()}},
                         ensure_ascii=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
