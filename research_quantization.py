"""Quantization: the methods (a registry of small functions), `validate(args)` and the quantization step.

Every method has one signature, `(model, tokenizer, model_dir, args, data) -> info`: it writes the
quantized artifact to `model_dir` (ONNX or safetensors, never pickled code) through one of the formats of
`research_inference.FORMATS`, which writes `compression_info.json`, and returns that info. `validate(args)`
refuses impossible settings before any training; `step` quantizes a stored stage.

| method  | what is stored / what runs                                                        | backend        |
|---------|-----------------------------------------------------------------------------------|----------------|
| dynamic | int8 weights; activations quantized per batch at run time                         | ONNX Runtime   |
| static  | int8 weights and uint8 activations with ranges calibrated on training batches     | ONNX Runtime   |
| qat     | fake-quant fine-tune (ranges learned in training), then the same real int8 graph  | PyTorch -> ORT |
| fp16    | half-precision safetensors (fp16, or bf16 with --quant_dtype bf16)                 | PyTorch        |
| int4    | 4-bit blockwise weights: int4 (ORT MatMulNBits, CPU) or nf4/fp4 (bitsandbytes, CUDA)| ORT / bnb      |

Integer weights are always symmetric (zero point 0; int4 uses the fixed offset 8), so a pruned weight
stays exactly zero after quantization. Backend choice: see README "Quantization backend" (ONNX Runtime
int8 measured fastest on our CPU; `torch.ao.quantization` is deprecated in torch 2.13 and is not used).
"""

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from research_data import batches_of, tokenized_splits
from research_errors import MethodNotAvailable, UsageError
from research_inference import ONNX_FILE, export_to_onnx, load_trainable_model, save_bnb4, save_hf, save_onnx
from research_models import HEAD_MODULES
from research_training import stage_info, train_classifier, training_pos_weight, trim_vocabulary_if_asked, work_folder

QUANT_DTYPES = ['int8', 'int4', 'nf4', 'fp4', 'fp16', 'bf16']
# --quant_method -> the --quant_dtype values it accepts; the first is its default.
METHOD_DTYPES = {
    'dynamic': ('int8',),
    'static': ('int8',),
    'qat': ('int8',),
    'fp16': ('fp16', 'bf16'),
    'int4': ('int4', 'nf4', 'fp4'),
}
INT4_BLOCK_SIZE = 32


@dataclass
class QuantizationData:
    """What a quantizer may use: the training split (calibration, QAT), the validation split (QAT early
    stopping), the per-label BCE pos_weight (QAT loss), and the stage's record (labels, max_length, ...)
    that its saved folder carries."""
    train: object
    val: object = None
    pos_weight: Optional[np.ndarray] = None
    info: Dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# ONNX export and ONNX Runtime helpers
# ---------------------------------------------------------------------------------------------

def linear_matmul_inputs(onnx_path: str, weight_names: Dict[str, str]) -> Dict[str, tuple]:
    """PyTorch Linear weight name -> (MatMul node name, name of its activation input) for every MatMul of
    the exported graph whose second input is a stored weight: the layers that int8 quantization acts on."""
    import onnx
    result = {}
    for node in onnx.load(onnx_path).graph.node:
        if node.op_type == 'MatMul' and node.input[1] in weight_names:
            result[weight_names[node.input[1]]] = (node.name, node.input[0])
    return result


class TokenizedBatchReader:
    """ONNX Runtime calibration reader: `batches` padded batches of a tokenized split, as int64 arrays."""

    def __init__(self, dataset, tokenizer, input_names: List[str], batch_size: int, batches: int):
        self._batches = []
        for batch in batches_of(dataset, tokenizer, batch_size):
            if len(self._batches) >= batches:
                break
            ids = batch['input_ids']
            self._batches.append({name: np.asarray(batch[name].numpy() if name in batch else np.zeros(tuple(ids.shape)),
                                                   dtype=np.int64) for name in input_names})
        self._iter: Iterator = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def onnx_input_names(onnx_path: str) -> List[str]:
    import onnx
    return [i.name for i in onnx.load(onnx_path).graph.input]


@contextlib.contextmanager
def quiet_onnxruntime_quantizer():
    """ONNX Runtime's quantizer logs advice meant for its developers ('run pre-processing', per-op notes)
    through the root logger, and a harmless numpy warning for all-zero int4 blocks; users of this tool
    would wonder about them, so they are held back (errors still show)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # MatMulNBits: an all-zero block (e.g. pruned) has scale 0; ORT divides before np.where picks 0.
            warnings.filterwarnings('ignore', message='invalid value encountered in divide', category=RuntimeWarning)
            yield
    finally:
        root.setLevel(level)


def onnx_info(method: str, weight_dtype: str, mapping: Dict[str, str], **extra) -> dict:
    return {'onnx_weight_names': mapping, 'quant_method': method, 'weight_dtype': weight_dtype, 'backend': 'onnxruntime',
            **extra}


def quantize_onnx_static_int8(fp32_path: str, out_path: str, reader, nodes: List[str],
                              overrides: Optional[Dict[str, list]] = None) -> None:
    """QDQ static int8 with ONNX Runtime: the given MatMul nodes get int8 weights (symmetric, per output
    channel) and uint8 activations (per tensor, ranges from calibration or from `overrides`); embedding
    tables (Gather) get int8 weights. QDQ measured as fast as or faster than QOperator here."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    gathers = embedding_gather_nodes(fp32_path)
    with quiet_onnxruntime_quantizer():
        quantize_static(fp32_path, out_path, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=['MatMul', 'Gather'],
                        nodes_to_quantize=list(nodes) + gathers, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={'WeightSymmetric': True, 'ActivationSymmetric': False, 'MatMulConstBOnly': True,
                                       'TensorQuantOverrides': overrides or {}})


def embedding_gather_nodes(onnx_path: str) -> List[str]:
    """Names of the Gather nodes that look up a stored table (word, position, token-type embeddings)."""
    import onnx
    graph = onnx.load(onnx_path).graph
    initializers = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == 'Gather' and n.input[0] in initializers]


# ---------------------------------------------------------------------------------------------
# dynamic
# ---------------------------------------------------------------------------------------------

def quantize_dynamic_int8(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """Dynamic int8 (ONNX Runtime): weights stored as symmetric int8 (zero point 0, so pruned zeros stay
    exactly zero), activations quantized per batch at run time. Writes `model_dir/model.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    os.makedirs(model_dir, exist_ok=True)
    fp32_path = os.path.join(model_dir, 'model_fp32.onnx')
    mapping = export_to_onnx(model, tokenizer, fp32_path, args.max_length)
    with quiet_onnxruntime_quantizer():
        quantize_dynamic(fp32_path, os.path.join(model_dir, ONNX_FILE), weight_type=QuantType.QInt8,
                         extra_options={'WeightSymmetric': True})
    os.remove(fp32_path)
    return save_onnx(model_dir, model, tokenizer, data.info | onnx_info('dynamic', 'int8', mapping, activation_dtype='int8 (dynamic, per batch)'))


# ---------------------------------------------------------------------------------------------
# static
# ---------------------------------------------------------------------------------------------

def quantize_static_int8(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """Static int8 (post-training, ONNX Runtime QDQ): activation ranges (min/max) calibrated on
    `--quant_calibration_batches` training batches, then fixed; int8 weights per output channel."""
    os.makedirs(model_dir, exist_ok=True)
    fp32_path = os.path.join(model_dir, 'model_fp32.onnx')
    mapping = export_to_onnx(model, tokenizer, fp32_path, args.max_length)
    layers = linear_matmul_inputs(fp32_path, mapping)
    reader = TokenizedBatchReader(data.train, tokenizer, onnx_input_names(fp32_path), args.batch,
                                  args.quant_calibration_batches)
    print(f'[quant] static int8: calibrating {len(layers)} Linear layers on {len(reader)} training batches of {args.batch}')
    quantize_onnx_static_int8(fp32_path, os.path.join(model_dir, ONNX_FILE), reader, [n for n, _ in layers.values()])
    os.remove(fp32_path)
    return save_onnx(model_dir, model, tokenizer, data.info | onnx_info('static', 'int8', mapping, activation_dtype='uint8 (static, calibrated)',
                                                            calibration_batches=len(reader)))


# ---------------------------------------------------------------------------------------------
# qat
# ---------------------------------------------------------------------------------------------

def uint8_affine_qparams(low: torch.Tensor, high: torch.Tensor):
    """Scale and zero point of asymmetric uint8 for the range [low, high] widened to include 0 (the
    formula ONNX Runtime uses): scale = (high - low) / 255, zero_point = round(-low / scale)."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / 255.0, min=1e-8)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255).to(torch.int32)
    return scale.float(), zero_point


class FakeQuantLinear(torch.nn.Module):
    """A Linear layer trained through fake quantization (Jacob et al. 2018): its input is rounded to uint8
    with a per-tensor range tracked as an exponential moving average of batch min/max during training,
    its weight to symmetric int8 per output channel (scale = max|w| / 127); gradients pass straight
    through the rounding. Pruned (exactly zero) weights are held at zero by a mask."""

    def __init__(self, linear: torch.nn.Linear, momentum: float = 0.01):
        super().__init__()
        self.linear = linear
        self.momentum = momentum
        self.register_buffer('input_min', torch.zeros(()))
        self.register_buffer('input_max', torch.zeros(()))
        self.register_buffer('observed', torch.zeros((), dtype=torch.bool))
        self.register_buffer('weight_mask', (linear.weight.detach() != 0).to(linear.weight.dtype))

    def observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().min().float(), x.detach().max().float()
        if not bool(self.observed):
            self.input_min.copy_(low)
            self.input_max.copy_(high)
            self.observed.fill_(True)
        else:
            self.input_min.lerp_(low, self.momentum)
            self.input_max.lerp_(high, self.momentum)

    def masked_weight(self) -> torch.Tensor:
        return self.linear.weight * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.observed):
            self.observe(x)
        scale, zero_point = uint8_affine_qparams(self.input_min, self.input_max)
        x_q = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, 255)
        weight = self.masked_weight()
        w_scale = torch.clamp(weight.detach().abs().amax(dim=1).float() / 127.0, min=1e-8)
        w_q = torch.fake_quantize_per_channel_affine(weight, w_scale, torch.zeros_like(w_scale, dtype=torch.int32),
                                                     0, -128, 127)
        return torch.nn.functional.linear(x_q, w_q, self.linear.bias)


def _set_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def insert_fake_quant(model, module_names: List[str]) -> Dict[str, FakeQuantLinear]:
    """Replace the named Linear layers by `FakeQuantLinear` wrappers (in place); returns the wrappers."""
    wrappers = {}
    for name in module_names:
        wrappers[name] = FakeQuantLinear(model.get_submodule(name))
        _set_module(model, name, wrappers[name])
    return wrappers


def remove_fake_quant(model, wrappers: Dict[str, FakeQuantLinear]) -> None:
    """Put the trained Linear layers back (pruning masks made permanent), keeping the learned ranges
    in `wrappers`."""
    for name, wrapper in wrappers.items():
        with torch.no_grad():
            wrapper.linear.weight.mul_(wrapper.weight_mask)
        _set_module(model, name, wrapper.linear)


def learned_activation_overrides(wrappers: Dict[str, FakeQuantLinear], layers: Dict[str, tuple]) -> Dict[str, list]:
    """ONNX Runtime tensor overrides that fix each quantized MatMul input to the scale and zero point
    learned during QAT (layers reading the same tensor, e.g. query/key/value, share the union range)."""
    ranges: Dict[str, list] = {}
    for name, wrapper in wrappers.items():
        _, tensor = layers[name + '.weight']
        low, high = float(wrapper.input_min), float(wrapper.input_max)
        if tensor in ranges:
            low, high = min(low, ranges[tensor][0]), max(high, ranges[tensor][1])
        ranges[tensor] = [low, high]
    overrides = {}
    for tensor, (low, high) in ranges.items():
        scale, zero_point = uint8_affine_qparams(torch.tensor(low), torch.tensor(high))
        overrides[tensor] = [{'scale': np.array(scale.item(), dtype=np.float32),
                             'zero_point': np.array(zero_point.item(), dtype=np.uint8)}]
    return overrides


def quantization_aware_training_int8(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """QAT (Jacob et al. 2018): fake quantization inserted in every Linear layer that int8 inference
    quantizes, `--fine_tune_epochs` of fine-tuning through it (weights adapt to the rounding while the
    activation ranges are tracked), then conversion to a real int8 ONNX Runtime graph that uses exactly
    the activation ranges of training and the same weight rounding (symmetric, per output channel)."""
    if data.val is None:
        raise UsageError('--quant_method qat fine-tunes the model and needs the validation split for early stopping.')
    os.makedirs(model_dir, exist_ok=True)
    model = copy.deepcopy(model).cpu()
    fp32_path = os.path.join(model_dir, 'model_fp32.onnx')
    layers = linear_matmul_inputs(fp32_path, export_to_onnx(model, tokenizer, fp32_path, args.max_length))
    modules = [name[:-len('.weight')] for name in layers if name.endswith('.weight')]
    wrappers = insert_fake_quant(model, modules)
    learning_rate = args.fine_tune_lr or args.lr / 2
    print(f'[quant] QAT: fake quantization in {len(wrappers)} Linear layers, {args.fine_tune_epochs} epoch(s) at lr {learning_rate:g}')
    model = train_classifier(model, tokenizer, data.train, data.val, data.pos_weight, args,
                             work_folder(args, model_dir), args.fine_tune_epochs, learning_rate)
    model = model.cpu().eval()
    wrappers = {name: model.get_submodule(name) for name in modules}
    remove_fake_quant(model, wrappers)
    mapping = export_to_onnx(model, tokenizer, fp32_path, args.max_length)
    layers = linear_matmul_inputs(fp32_path, mapping)
    # Every quantized activation has a learned range; one training batch satisfies the quantizer's API.
    reader = TokenizedBatchReader(data.train, tokenizer, onnx_input_names(fp32_path), args.batch, 1)
    overrides = learned_activation_overrides(wrappers, layers)
    quantize_onnx_static_int8(fp32_path, os.path.join(model_dir, ONNX_FILE), reader, [n for n, _ in layers.values()],
                              overrides=overrides)
    os.remove(fp32_path)
    learned = {tensor: [float(o[0]['scale']), int(o[0]['zero_point'])] for tensor, o in overrides.items()}
    return save_onnx(model_dir, model, tokenizer, data.info | onnx_info('qat', 'int8', mapping, activation_dtype='uint8 (static, ranges learned in QAT)',
                     qat_epochs=args.fine_tune_epochs, qat_learning_rate=learning_rate, qat_activation_qparams=learned))


# ---------------------------------------------------------------------------------------------
# fp16 / bf16
# ---------------------------------------------------------------------------------------------

HALF_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def convert_to_half_precision(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """Half precision: every floating-point weight stored as fp16 (or bf16 with --quant_dtype bf16) in
    safetensors; the model runs in that precision (PyTorch) on the device it is loaded on."""
    half = copy.deepcopy(model).to(HALF_DTYPES[args.quant_dtype_resolved])
    return save_hf(model_dir, half, tokenizer, data.info | {'quant_method': 'fp16', 'weight_dtype': args.quant_dtype_resolved,
                                                'compute_dtype': args.quant_dtype_resolved, 'backend': 'pytorch'})


# ---------------------------------------------------------------------------------------------
# int4
# ---------------------------------------------------------------------------------------------

def quantize_int4_onnxruntime(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """4-bit weights on CPU (ONNX Runtime MatMulNBits / GatherBlockQuantized): symmetric round-to-nearest
    int4 in blocks of 32 input values, one fp scale per block (zero maps to code 8, i.e. exactly 0);
    activations are quantized to int8 per block inside the kernel (accuracy_level 4)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    os.makedirs(model_dir, exist_ok=True)
    fp32_path = os.path.join(model_dir, 'model_fp32.onnx')
    mapping = export_to_onnx(model, tokenizer, fp32_path, args.max_length)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True, accuracy_level=4,
                                          op_types_to_quantize=('MatMul', 'Gather'),
                                          quant_axes=(('MatMul', 0), ('Gather', 1)))
    with quiet_onnxruntime_quantizer():
        quantizer = MatMulNBitsQuantizer(onnx.load(fp32_path), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(os.path.join(model_dir, ONNX_FILE))
    os.remove(fp32_path)
    return save_onnx(model_dir, model, tokenizer, data.info | onnx_info('int4', 'int4', mapping, int4_block_size=INT4_BLOCK_SIZE,
                                                            activation_dtype='int8 inside the 4-bit kernel (accuracy_level 4)'))


def check_bitsandbytes_available(dtype: str) -> None:
    """NF4/FP4 (bitsandbytes) run only on a CUDA GPU: refuse clearly anywhere else."""
    if not torch.cuda.is_available():
        raise MethodNotAvailable(
            f'--quant_method int4 --quant_dtype {dtype} uses bitsandbytes {dtype.upper()} 4-bit weights, which need a '
            'CUDA GPU, and this machine has none (torch.cuda.is_available() is False). On a CPU use '
            '--quant_dtype int4 (4-bit weights through ONNX Runtime MatMulNBits), or run on a machine with an '
            'NVIDIA GPU and `pip install bitsandbytes`.')
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodNotAvailable(f'--quant_method int4 --quant_dtype {dtype} needs the bitsandbytes package: '
                                 'pip install bitsandbytes (CUDA GPU required).')


def quantize_4bit_bitsandbytes(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """4-bit NF4 (Dettmers et al. 2023, QLoRA) or FP4 weights with bitsandbytes on CUDA: blockwise absmax
    (blocks of 64) onto the 16 NF4/FP4 levels (both hold an exact 0); compute in bf16/fp16 on the GPU.
    Saved with `save_pretrained` (safetensors holding the packed 4-bit weights and their statistics)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    check_bitsandbytes_available(args.quant_dtype_resolved)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_dtype_resolved, bnb_4bit_compute_dtype=compute,
                                llm_int8_skip_modules=list(HEAD_MODULES))
    with tempfile.TemporaryDirectory() as fp32_dir:
        model.save_pretrained(fp32_dir, safe_serialization=True)
        # Everything bitsandbytes does not quantize (embeddings, LayerNorms, biases, the head) is kept in the
        # 16-bit compute dtype, as QLoRA does; in fp32 the embedding table alone would be 47 MB of MiniLM's file.
        quantized = AutoModelForSequenceClassification.from_pretrained(fp32_dir, quantization_config=config, dtype=compute,
                                                                       device_map={'': torch.cuda.current_device()})
    return save_bnb4(model_dir, quantized, tokenizer, data.info | {'quant_method': 'int4', 'weight_dtype': args.quant_dtype_resolved,
                                                       'compute_dtype': str(compute).replace('torch.', ''),
                                                       'backend': 'bitsandbytes (CUDA)'})


# --quant_dtype of --quant_method int4 -> function(model, tokenizer, model_dir, args, data) -> info
INT4_BACKENDS = {
    'int4': quantize_int4_onnxruntime,
    'nf4': quantize_4bit_bitsandbytes,
    'fp4': quantize_4bit_bitsandbytes,
}


def quantize_weights_4bit(model, tokenizer, model_dir: str, args, data: QuantizationData) -> dict:
    """4-bit weights with the backend of `--quant_dtype`: int4 -> ONNX Runtime (CPU), nf4/fp4 ->
    bitsandbytes (CUDA). Never falls back to another precision."""
    return INT4_BACKENDS[args.quant_dtype_resolved](model, tokenizer, model_dir, args, data)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# --quant_method name -> function(model, tokenizer, model_dir, args, data) -> saved-model info
QUANT_METHODS = {
    'dynamic': quantize_dynamic_int8,
    'static': quantize_static_int8,
    'qat': quantization_aware_training_int8,
    'fp16': convert_to_half_precision,
    'int4': quantize_weights_4bit,
}


def resolve_quant_dtype(method: str, dtype: Optional[str]) -> str:
    """The storage type for `method`: `dtype` if the method supports it, its default when None."""
    allowed = METHOD_DTYPES[method]
    if dtype is None:
        return allowed[0]
    if dtype not in allowed:
        raise UsageError(f"--quant_dtype {dtype} does not fit --quant_method {method}, which stores "
                         f"{' or '.join(allowed)}. Drop --quant_dtype (default {allowed[0]}) or choose "
                         + ', '.join(f'{m} for {"/".join(d)}' for m, d in METHOD_DTYPES.items() if dtype in d) + '.')
    return dtype


def validate(args) -> None:
    """Refuse, before any training, quantization settings that cannot run here (unknown method, a dtype the
    method does not store, nf4/fp4 without CUDA and bitsandbytes, no calibration batches)."""
    if args.quant_method not in QUANT_METHODS:
        raise UsageError(f"Unknown --quant_method '{args.quant_method}'. Choose one of: {', '.join(QUANT_METHODS)}.")
    dtype = resolve_quant_dtype(args.quant_method, args.quant_dtype)
    if args.quant_method == 'int4' and dtype in ('nf4', 'fp4'):
        check_bitsandbytes_available(dtype)
    if args.quant_calibration_batches < 1:
        raise UsageError('--quant_calibration_batches must be at least 1.')
    if args.quant_method == 'qat' and args.fine_tune_epochs < 1:
        raise UsageError(f'--quant_method qat fine-tunes through fake quantization for --fine_tune_epochs, which must be '
                         f'at least 1 (got {args.fine_tune_epochs}); or use --quant_method static (no training).')


def quantize_and_save(model, tokenizer, model_dir: str, args, train_dataset, val_dataset=None,
                      pos_weight=None, info: Optional[Dict] = None) -> dict:
    """Quantize with `--quant_method` (its --quant_dtype resolved at parse time) and write the artifact, with
    `info` in its compression_info.json, to `model_dir`; returns that info."""
    return QUANT_METHODS[args.quant_method](model, tokenizer, model_dir, args,
                                            QuantizationData(train_dataset, val_dataset, pos_weight, dict(info or {})))


def trains(settings) -> bool:
    """Whether the quant step trains (QAT fine-tunes), so that every process of a data-parallel run takes part."""
    return settings.quant_method == 'qat'


def step(parent, data, settings, out_dir: str) -> Dict:
    """Quantize the parent stage; the quantizer writes its own artifact (e.g. an int8 ONNX file)."""
    model, tokenizer = load_trainable_model(parent.path)
    model, tokenizer, trim_report = trim_vocabulary_if_asked(model, tokenizer, data, settings)
    splits = tokenized_splits(data, tokenizer, settings.max_length, settings.cache_dir)
    quantize_and_save(model, tokenizer, out_dir, settings, splits.train, splits.val, training_pos_weight(data),
                      stage_info(settings, 'quant', data))
    return {'linear_roles': parent.meta['linear_roles'], 'prune_layers': parent.meta.get('prune_layers'),
            'report': trim_report}
