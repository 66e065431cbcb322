"""Knowledge distillation: the student (loaded, or derived from the teacher), the distillation losses, the
intermediate-layer matches, the teacher-logit cache, the distillation trainer (a Hugging Face `Trainer`
with a distillation `compute_loss`), `validate(args)` and the KD step.

    loss = alpha * T^2 * BCE(student/T, sigmoid(teacher/T))          (Hinton et al. 2015, per label)
         + (1 - alpha) * BCE(labels, pos_weight)
         + hidden_loss_weight * mean over mapped layers of MSE(W h_S, h_T)       (TinyBERT, Jiao et al. 2020)
         + attention_loss_weight * mean over mapped layers of KL(A_T || A_S)     (MiniLM, Wang et al. 2020)

Multi-label throughout: soft targets are per-label sigmoids, never a softmax over labels. `--kd_method`
picks which intermediate terms are added (`KD_METHODS`); each term is a small loss function with the
signature `(feature_S, feature_T, mask=None)` (`MATCH_LOSSES`), as in TextBrewer.
"""

import contextlib
import copy
import hashlib
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from research_batching import in_text_order, length_sorted_batches
from research_data import tokenized_splits, tokenizer_fingerprint
from research_distributed import main_process_first
from research_errors import UsageError
from research_files import atomic_write, remove_entry
from research_inference import load_trainable_model, save_hf
from research_model_folders import check_model_folder
from research_models import (check_model_source, configured_depth, linear_weight_roles, load_encoder_for_classification,
                             load_tokenizer, model_inputs, weights_fingerprint)
from research_training import (MultiLabelTrainer, make_trainer, run_training, stage_info, training_pos_weight,
                               trim_vocabulary_if_asked, validate_trimming, work_folder)

# Columns that carry the teacher's own tokenization through the student's training set (different tokenizers).
TEACHER_TOKEN_PREFIX = 'teacher_'
TEACHER_TOKEN_COLUMNS = ('input_ids', 'attention_mask', 'token_type_ids')
TEACHER_LOGITS_COLUMN = 'teacher_logits'
TEACHER_LOGITS_PREFIX = 'teacher_logits_'   # cache files <cache_dir>/teacher_logits_<key>.npy


# ---------------------------------------------------------------------------------------------
# Losses: small pure functions (see STYLE.md)
# ---------------------------------------------------------------------------------------------

def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 for multi-label outputs: T^2 * BCE(sigmoid(s/T), sigmoid(t/T)), per label."""
    soft_targets = torch.sigmoid(teacher_logits.float() / temperature)
    return temperature ** 2 * F.binary_cross_entropy_with_logits(student_logits.float() / temperature, soft_targets)


def hidden_mse_loss(feature_S: torch.Tensor, feature_T: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TinyBERT (Jiao et al. 2020) hidden-state loss: MSE(H_S W_h, H_T) over the non-padding tokens.
    Features [batch, tokens, width] (the student's already projected); mask [batch, tokens], 1 = real token."""
    squared = (feature_S.float() - feature_T.float()).pow(2).mean(dim=-1)           # [batch, tokens]
    if mask is None:
        return squared.mean()
    mask = mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


def attention_kl_loss(feature_S: torch.Tensor, feature_T: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention-distribution loss of MiniLM (Wang et al. 2020): KL(A_T || A_S) per query row,
    sum_k A_T[q,k] * (log A_T[q,k] - log A_S[q,k]), averaged over the non-padding query rows; padding keys
    are left out. Features are head-averaged attention maps [batch, query, key] (rows sum to 1)."""
    eps = 1e-8
    target, prediction = feature_T.float(), feature_S.float()
    per_key = target * (target.clamp_min(eps).log() - prediction.clamp_min(eps).log())   # [batch, q, k]
    if mask is None:
        return per_key.sum(dim=-1).mean()
    mask = mask.to(per_key.dtype)
    per_row = (per_key * mask[:, None, :]).sum(dim=-1)                                 # padding keys out
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)                          # padding queries out


# name -> loss(feature_S, feature_T, mask=None)
MATCH_LOSSES: Dict[str, Callable] = {
    'hidden_mse': hidden_mse_loss,
    'attention_kl': attention_kl_loss,
}


# ---------------------------------------------------------------------------------------------
# Features: what is taken from a model's outputs for one encoder layer
# ---------------------------------------------------------------------------------------------

def hidden_state_of_layer(outputs, layer: int) -> torch.Tensor:
    """Output of encoder layer `layer` (0-based): hidden_states[0] is the embedding output."""
    return outputs.hidden_states[layer + 1]


def head_averaged_attention_of_layer(outputs, layer: int) -> torch.Tensor:
    """Attention probabilities of encoder layer `layer`, averaged over heads -> [batch, query, key].
    Averaging makes maps comparable when teacher and student have different head counts."""
    return outputs.attentions[layer].float().mean(dim=1)


# feature name -> (what to read from the model outputs, default loss, forward flag that produces it)
FEATURES = {
    'hidden': (hidden_state_of_layer, 'hidden_mse', 'output_hidden_states'),
    'attention': (head_averaged_attention_of_layer, 'attention_kl', 'output_attentions'),
}


@dataclass(frozen=True)
class FeatureMatch:
    """One intermediate-layer term, declared as data (TextBrewer's `intermediate_matches` entry)."""
    feature: str     # key of FEATURES
    layer_S: int     # 0-based student encoder layer
    layer_T: int     # 0-based teacher encoder layer
    loss: str        # key of MATCH_LOSSES
    weight: float


# ---------------------------------------------------------------------------------------------
# --kd_method registry: name -> matches(layer_pairs, weights), `weights` anything with the loss weights as
# attributes (the settings): each method reads only its own weights, so only those are part of a KD stage's identity
# ---------------------------------------------------------------------------------------------

def _matches_for(feature: str, layer_pairs: Sequence[Tuple[int, int]], weight: float) -> List[FeatureMatch]:
    """One match per mapped layer pair; the weight is shared so the term is a mean over layers."""
    loss = FEATURES[feature][1]
    return [FeatureMatch(feature, s, t, loss, weight / len(layer_pairs)) for s, t in layer_pairs]


def logit_matches(layer_pairs, weights) -> List[FeatureMatch]:
    """`logit` (Hinton et al. 2015): soft targets only, no intermediate term (teacher logits cached on disk)."""
    return []


def hidden_matches(layer_pairs, weights) -> List[FeatureMatch]:
    """`hidden` (TinyBERT): logit KD + hidden_loss_weight * mean_l MSE(W h_S(l), h_T(m(l)))."""
    return _matches_for('hidden', layer_pairs, weights.hidden_loss_weight)


def attention_matches(layer_pairs, weights) -> List[FeatureMatch]:
    """`attention` (TinyBERT's attention transfer, MiniLM's KL form): logit KD + attention_loss_weight *
    mean_l KL(A_T(m(l)) || A_S(l)) on head-averaged maps."""
    return _matches_for('attention', layer_pairs, weights.attention_loss_weight)


def multi_level_matches(layer_pairs, weights) -> List[FeatureMatch]:
    """`multi_level`: logit + hidden + attention terms, each with its weight."""
    return hidden_matches(layer_pairs, weights) + attention_matches(layer_pairs, weights)


UNIT_WEIGHTS = SimpleNamespace(hidden_loss_weight=1.0, attention_loss_weight=1.0)   # which features a method uses

# --kd_method name -> function giving the intermediate-layer matches added to the logit term
KD_METHODS: Dict[str, Callable] = {
    'logit': logit_matches,
    'hidden': hidden_matches,
    'attention': attention_matches,
    'multi_level': multi_level_matches,
}


def method_features(kd_method: str) -> set:
    """The intermediate features a method compares (empty for `logit`)."""
    return {m.feature for m in KD_METHODS[kd_method]([(0, 0)], UNIT_WEIGHTS)}


# ---------------------------------------------------------------------------------------------
# Layer mapping and tokenizer compatibility
# ---------------------------------------------------------------------------------------------

def parse_layer_map(value: str) -> List[Tuple[int, int]]:
    """'0:1,1:3,2:5' -> [(0, 1), (1, 3), (2, 5)]: student layer : teacher layer, 0-based encoder layers."""
    pairs = []
    for item in (v.strip() for v in value.split(',')):
        match = re.fullmatch(r'(\d+)\s*:\s*(\d+)', item)
        if match is None:
            raise UsageError(f"--kd_layer_map must be comma-separated student:teacher pairs of 0-based encoder layers, "
                             f"e.g. '0:1,1:3,2:5'; could not read '{item}' in '{value}'.")
        pairs.append((int(match.group(1)), int(match.group(2))))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise UsageError(f"--kd_layer_map '{value}' maps a student layer twice; give each student layer one teacher layer.")
    return pairs


def uniform_layer_choice(teacher_layers: int, student_layers: int) -> List[int]:
    """Teacher layers kept for an N-layer student, spread uniformly and ending at the top layer
    (TinyBERT's mapping m -> m*L/N, 1-based)."""
    if not 1 <= student_layers <= teacher_layers:
        raise UsageError(f'--student_layers {student_layers} must be between 1 and the teacher depth ({teacher_layers}).')
    return [round((m + 1) * teacher_layers / student_layers) - 1 for m in range(student_layers)]


def default_layer_pairs(student_depth: int, teacher_depth: int, derived_from: Optional[Sequence[int]] = None):
    """Student layer i -> the teacher layer it was copied from (derived student), else TinyBERT's uniform
    mapping i -> round((i+1) * L_T / L_S) - 1."""
    if derived_from is not None and len(derived_from) == student_depth and all(0 <= t < teacher_depth for t in derived_from):
        return list(enumerate(int(t) for t in derived_from))
    if student_depth > teacher_depth:
        raise UsageError(f'The student has more layers ({student_depth}) than the teacher ({teacher_depth}), so there is '
                         'no uniform layer mapping; give one with --kd_layer_map, e.g. 0:0,1:0,2:1.')
    return list(enumerate(uniform_layer_choice(teacher_depth, student_depth)))


def resolve_layer_pairs(layer_map: Optional[str], student, teacher) -> List[Tuple[int, int]]:
    """The student:teacher layer pairs (from --kd_layer_map or the default), checked against both depths."""
    depth_S, depth_T = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if not layer_map:
        return default_layer_pairs(depth_S, depth_T, getattr(student.config, 'derived_from_teacher_layers', None))
    return check_layer_map_range(layer_map, depth_S, depth_T)


def check_layer_map_range(layer_map: str, depth_S: int, depth_T: int) -> List[Tuple[int, int]]:
    pairs = parse_layer_map(layer_map)
    bad = [f'{s}:{t}' for s, t in pairs if not (0 <= s < depth_S and 0 <= t < depth_T)]
    if bad:
        raise UsageError(f"--kd_layer_map '{layer_map}': pair(s) {', '.join(bad)} out of range; student layers are "
                         f'0..{depth_S - 1}, teacher layers 0..{depth_T - 1}.')
    return pairs


def same_tokenization(student_tokenizer, teacher_tokenizer) -> bool:
    """True when both models see the same token sequence for every text (same tokenizer fingerprint)."""
    return tokenizer_fingerprint(student_tokenizer) == tokenizer_fingerprint(teacher_tokenizer)


def refuse_attention_across_tokenizers(kd_method: str) -> None:
    raise UsageError(
        f'--kd_method {kd_method} compares attention maps token by token, but the student and the teacher use '
        'different tokenizers, so their token sequences do not line up and their maps cannot be compared. Use '
        '--kd_method hidden (across tokenizers it matches the first-token [CLS] representation only) or logit, '
        'or derive the student from the teacher with --student_layers N (it shares the teacher tokenizer).')


def parse_student_layers(value: str):
    """'3' -> 3 (count, chosen uniformly); '0,2,5' -> [0, 2, 5] (explicit teacher layer indices)."""
    try:
        if ',' in value:
            layers = [int(v) for v in value.split(',') if v.strip()]
            if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
                raise ValueError(value)
            return layers
        count = int(value)
    except ValueError:
        raise UsageError(f"--student_layers must be a number ('3') or a list of distinct 0-based teacher layers "
                         f"('0,2,5'), got '{value}'.")
    if count < 1:
        raise UsageError(f'--student_layers must be at least 1, got {count}.')
    return count


def validate(args) -> None:
    """Refuse, before any training, distillation settings that cannot run: an unknown method, bad weights, a
    malformed --student_layers or --kd_layer_map, a derived student deeper than the teacher, a layer map out
    of range of either depth, or attention KD between models with different tokenizers."""
    if args.kd_method not in KD_METHODS:
        raise UsageError(f"Unknown --kd_method '{args.kd_method}'. Choose one of: {', '.join(KD_METHODS)}.")
    if not 0.0 <= args.kd_alpha <= 1.0:
        raise UsageError(f'--kd_alpha must be in [0, 1], got {args.kd_alpha}.')
    if args.kd_temperature <= 0:
        raise UsageError(f'--kd_temperature must be positive, got {args.kd_temperature}.')
    if args.epochs < 1:
        raise UsageError(f'--epochs (of student distillation) must be at least 1, got {args.epochs}.')
    if args.hidden_loss_weight < 0 or args.attention_loss_weight < 0:
        raise UsageError('--hidden_loss_weight and --attention_loss_weight must be >= 0.')
    depth_T = configured_depth(args.teacher_checkpoint or args.teacher_path)
    if args.student_layers:
        layers = parse_student_layers(args.student_layers)
        depth_S = layers if isinstance(layers, int) else len(layers)
        if depth_T is not None:
            listed = [] if isinstance(layers, int) else layers
            if depth_S > depth_T or any(not 0 <= i < depth_T for i in listed) or len(set(listed)) != len(listed):
                raise UsageError(f'--student_layers {args.student_layers} must keep between 1 and {depth_T} distinct '
                                 f'teacher layers (the teacher has {depth_T}: 0..{depth_T - 1}).')
    else:
        check_model_folder(args.student_path, '--student_path')   # config, whole weights and a real tokenizer
        check_model_source(args.student_path, args.max_length, '--student_path')
        depth_S = configured_depth(args.student_path)
    if args.kd_layer_map:
        parse_layer_map(args.kd_layer_map)
        if depth_T is not None and depth_S is not None:
            check_layer_map_range(args.kd_layer_map, depth_S, depth_T)
    validate_trimming(args, args.teacher_checkpoint or args.teacher_path if args.student_layers else args.student_path)
    if args.trim_vocab and args.trim_vocab_min_count > 1 and 'attention' in method_features(args.kd_method):
        raise UsageError(f'--kd_method {args.kd_method} compares attention maps token by token, but with '
                         f'--trim_vocab_min_count {args.trim_vocab_min_count} the student reads rare training words as '
                         'the unknown token, so its token positions no longer line up with the teacher\'s. Use '
                         '--trim_vocab_min_count 1 (every training token kept), or --kd_method logit or hidden.')
    if 'attention' in method_features(args.kd_method) and not args.student_layers:
        try:
            tokenizers = load_tokenizer(args.student_path), load_tokenizer(args.teacher_checkpoint or args.teacher_path)
        except UsageError:   # not loadable now: the teacher step, which runs first, says why
            return
        if not same_tokenization(*tokenizers):
            refuse_attention_across_tokenizers(args.kd_method)


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------

def derive_student_from_teacher(teacher, layers: Union[int, Sequence[int]]):
    """DistilBERT-style initialisation (Sanh et al. 2019): a copy of the teacher keeping only the chosen
    encoder layers (embeddings, kept layers, pooler and head copied). Shares the teacher's tokenizer."""
    depth = teacher.config.num_hidden_layers
    keep = uniform_layer_choice(depth, layers) if isinstance(layers, int) else list(layers)
    if any(not 0 <= i < depth for i in keep) or len(set(keep)) != len(keep):
        raise UsageError(f'--student_layers {keep} must list distinct teacher layers in [0, {depth - 1}].')
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    student = type(teacher)(config)
    new_index = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(r'(\.layer\.)(\d+)(\.)')
    state = {}
    for key, value in teacher.state_dict().items():
        match = layer_key.search(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in new_index:
            state[layer_key.sub(lambda m: f'{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}', key, count=1)] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if [k for k in missing if 'position_ids' not in k] or unexpected:
        raise RuntimeError(f'student derivation failed: missing {missing}, unexpected {unexpected}')
    student.config.derived_from_teacher_layers = keep
    print(f'[kd] student derived from the teacher: layers {keep} of {depth}')
    return student


# ---------------------------------------------------------------------------------------------
# Teacher logits, computed once and cached on disk
# ---------------------------------------------------------------------------------------------

def teacher_logits_cache_key(teacher, teacher_tokenizer, data, max_length: int) -> str:
    """Teacher weights + data content (texts, labels) + which rows are trained on + tokenizer + max_length."""
    rows = hashlib.sha256(np.asarray(data.train_idx, dtype=np.int64).tobytes()).hexdigest()[:12]
    return (f'{TEACHER_LOGITS_PREFIX}{weights_fingerprint(teacher)}_{data.content_hash()}_{rows}_'
            f'{tokenizer_fingerprint(teacher_tokenizer)}_{max_length}.npy')


def teacher_logits_on(teacher, teacher_tokenizer, dataset, batch_size: int = 64) -> np.ndarray:
    """Teacher logits for every row of a tokenized split (in the teacher's tokenization), eval mode, no grad;
    batches sorted by length, logits in the split's row order."""
    device = next(teacher.parameters()).device
    teacher.eval()
    chunks = []
    with torch.inference_mode():
        for rows, batch in length_sorted_batches(dataset, teacher_tokenizer, batch_size):
            chunks.append((rows, teacher(**model_inputs(batch, device)).logits.float().cpu().numpy()))
    return in_text_order(chunks, len(dataset)).astype(np.float32)


def cached_teacher_logits(teacher, teacher_tokenizer, teacher_train_dataset, data, max_length: int,
                          cache_dir: Optional[str]) -> Tuple[np.ndarray, bool]:
    """(logits of the training rows, whether they came from the cache). Computed once per teacher weights,
    data, tokenization and max_length, then read from `cache_dir` (written atomically); a cache that does not
    read back as finite float32 logits of the right shape is rebuilt."""
    path = os.path.join(cache_dir, teacher_logits_cache_key(teacher, teacher_tokenizer, data, max_length)) if cache_dir else None
    expected = (len(teacher_train_dataset), teacher.config.num_labels)
    if path and os.path.lexists(path):
        logits, problem = read_logits_cache(path, expected)
        if problem is None:
            print(f'[kd] teacher logits read from the cache {path}')
            return logits, True
        print(f'[cache] teacher-logit cache {os.path.basename(path)}: {problem}: rebuilding')
        remove_entry(path)
    logits = teacher_logits_on(teacher, teacher_tokenizer, teacher_train_dataset)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(path, 'wb') as fh:
            np.save(fh, logits)
        print(f'[kd] teacher logits computed once and cached in {path}')
    return logits, False


def read_logits_cache(path: str, expected: Tuple[int, int]) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(logits, None) when the cached file reads as finite float32 logits of shape `expected`; else
    (None, what is wrong)."""
    try:
        logits = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f'unreadable ({type(exc).__name__})'
    if logits.shape != expected:
        return None, f'shape {logits.shape}, expected {expected}'
    if logits.dtype != np.float32:
        return None, f'dtype {logits.dtype}, expected float32'
    if not np.isfinite(logits).all():
        return None, f'{int((~np.isfinite(logits)).sum())} non-finite value(s) (NaN or inf)'
    os.utime(path)                    # last use, for --cache_report and pruning
    return logits, None


# ---------------------------------------------------------------------------------------------
# Distillation training
# ---------------------------------------------------------------------------------------------

def split_teacher_columns(feature: dict) -> Tuple[dict, dict]:
    """(student features, teacher token features without the prefix) of one training row."""
    student, teacher = {}, {}
    for key, value in feature.items():
        name = key[len(TEACHER_TOKEN_PREFIX):] if key.startswith(TEACHER_TOKEN_PREFIX) else None
        if name in TEACHER_TOKEN_COLUMNS:
            teacher[name] = value
        else:
            student[key] = value
    return student, teacher


class TeacherTokensCollator:
    """Pads the student's tokens with the student collator and, when present, the teacher's own tokens
    (`teacher_input_ids`, ...) with the teacher tokenizer, so each model gets its own tokenization."""

    def __init__(self, student_collator, teacher_tokenizer):
        self.student_collator = student_collator
        self.teacher_tokenizer = teacher_tokenizer

    def __call__(self, features):
        student_rows, teacher_rows = zip(*(split_teacher_columns(f) for f in features))
        batch = self.student_collator(list(student_rows))
        if teacher_rows[0]:
            padded = self.teacher_tokenizer.pad(list(teacher_rows), return_tensors='pt')
            batch.update({TEACHER_TOKEN_PREFIX + k: v for k, v in padded.items()})
        return batch


def feature_projections(matches: Sequence[FeatureMatch], student, teacher) -> torch.nn.ModuleDict:
    """A learned linear map W (student width -> teacher width) per hidden-state match when the widths differ
    (TinyBERT's W_h). Trained with the student, never saved with it."""
    width_S, width_T = student.config.hidden_size, teacher.config.hidden_size
    projections = torch.nn.ModuleDict()
    if width_S != width_T:
        for match in matches:
            if match.feature == 'hidden':
                projections[str(match.layer_S)] = torch.nn.Linear(width_S, width_T)
    return projections


def autocast_on_gpu(device: torch.device):
    """Half precision for the frozen teacher on CUDA (bf16 where supported), a no-op elsewhere."""
    if device.type != 'cuda':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast('cuda', dtype=dtype)


class StudentWithProjections(torch.nn.Module):
    """The student and its learned hidden-state projections as one module, so the Trainer optimizes, clips
    (one gradient norm) and - under DDP - all-reduces both; only `student` is saved as the stage model."""

    def __init__(self, student, projections: torch.nn.ModuleDict):
        super().__init__()
        self.student = student
        self.projections = projections

    @property
    def config(self):
        return self.student.config

    def forward(self, **inputs):
        """The student's outputs; with hidden states asked for, also each projected layer
        (`projected_hidden_states`: layer -> W·h), computed here so that under DDP the projections are part of
        the forward pass that DDP watches (their gradients are all-reduced like the student's)."""
        outputs = self.student(**inputs)
        hidden = getattr(outputs, 'hidden_states', None)
        if len(self.projections) and hidden is not None:
            outputs['projected_hidden_states'] = {
                layer: projection(hidden_state_of_layer(outputs, int(layer))) for layer, projection in self.projections.items()}
        return outputs


class DistillationTrainer(MultiLabelTrainer):
    """Hugging Face `Trainer` whose `compute_loss` is the distillation loss of the module docstring.

    `logit`: teacher logits come with each training batch (column `teacher_logits`, computed once on the
    teacher's own tokenization and cached). Intermediate methods run the teacher online: frozen, eval mode,
    no grad, half precision on GPU. When the tokenizers differ, the teacher gets its own tokens
    (`teacher_input_ids`, ...) and hidden states are compared on the first ([CLS]) token only.
    Evaluation batches are scored on the labels only. The model trained is `StudentWithProjections`."""

    def __init__(self, *args, model=None, kd_alpha: float, kd_temperature: float, matches: Sequence[FeatureMatch] = (),
                 teacher=None, teacher_tokenizer=None, tokens_aligned: bool = True, **kwargs):
        matches = list(matches)
        if matches and teacher is None:
            raise ValueError('intermediate-layer distillation needs the teacher model')
        if not isinstance(model, StudentWithProjections):
            projections = feature_projections(matches, model, teacher) if matches else torch.nn.ModuleDict()
            model = StudentWithProjections(model, projections)
        super().__init__(*args, model=model, **kwargs)
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.matches = matches
        self.tokens_aligned = tokens_aligned
        self.last_terms: Dict[str, torch.Tensor] = {}
        self.term_sums: Dict[str, torch.Tensor] = {}
        self.term_steps = 0
        self.teacher = teacher.to(self.args.device).eval() if matches else None
        self.previous_attention: Dict[int, tuple] = {}
        if self.needs_attention_maps():
            self.use_eager_attention()
        if teacher_tokenizer is not None:
            self.data_collator = TeacherTokensCollator(self.data_collator, teacher_tokenizer)

    @property
    def student(self):
        return self.model.student

    @property
    def projections(self) -> torch.nn.ModuleDict:
        return self.model.projections

    def needs_attention_maps(self) -> bool:
        return any(m.feature == 'attention' for m in self.matches)

    def use_eager_attention(self) -> None:
        """Attention maps need the eager attention kernel (SDPA returns none)."""
        for model in (self.student, self.teacher):
            if model.config._attn_implementation != 'eager':
                self.previous_attention[id(model)] = (model, model.config._attn_implementation)
                model.set_attn_implementation('eager')

    def restore_attention(self) -> None:
        for model, implementation in self.previous_attention.values():
            model.set_attn_implementation(implementation)
        self.previous_attention = {}

    def train(self, *args, **kwargs):
        """Training, with the models' own attention kernel given back afterwards."""
        if self.needs_attention_maps():
            self.use_eager_attention()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.restore_attention()

    # -- the loss --------------------------------------------------------------------------------
    def output_flags(self) -> Dict[str, bool]:
        return {FEATURES[m.feature][2]: True for m in self.matches}

    def teacher_outputs(self, inputs):
        """The frozen teacher's forward on its own tokens (or the student's, when the tokenizers agree)."""
        if TEACHER_TOKEN_PREFIX + 'input_ids' in inputs:   # the teacher's own token ids came with the batch
            teacher_inputs = {k: inputs[TEACHER_TOKEN_PREFIX + k] for k in TEACHER_TOKEN_COLUMNS
                              if TEACHER_TOKEN_PREFIX + k in inputs}
        else:
            teacher_inputs = model_inputs(inputs)
        with torch.no_grad(), autocast_on_gpu(self.args.device):
            return self.teacher(**teacher_inputs, **self.output_flags())

    def student_feature(self, match: FeatureMatch, outputs) -> torch.Tensor:
        layer = str(match.layer_S)
        if match.feature == 'hidden' and layer in (getattr(outputs, 'projected_hidden_states', None) or {}):
            return outputs.projected_hidden_states[layer]     # W·h, made in the model's forward (DDP sees it)
        feature = FEATURES[match.feature][0](outputs, match.layer_S)
        if match.feature == 'hidden' and layer in self.projections:   # outputs that did not come from that forward
            return self.projections[layer](feature)
        return feature

    def feature_terms(self, outputs_S, outputs_T, student_mask) -> Dict[str, torch.Tensor]:
        """Weighted intermediate-layer losses summed per feature ('hidden', 'attention')."""
        terms: Dict[str, torch.Tensor] = {}
        for match in self.matches:
            feature_S = self.student_feature(match, outputs_S)
            feature_T = FEATURES[match.feature][0](outputs_T, match.layer_T)
            mask = student_mask
            if not self.tokens_aligned:
                # Different tokenizers: only the first ([CLS]) token lines up (hidden only; attention is refused).
                feature_S, feature_T, mask = feature_S[:, :1], feature_T[:, :1], None
            loss = MATCH_LOSSES[match.loss](feature_S, feature_T, mask)
            terms[match.feature] = terms.get(match.feature, 0.0) + match.weight * loss
        return terms

    def distillation_terms(self, model, inputs) -> Tuple[Dict[str, torch.Tensor], object]:
        """Every term of the loss for one training batch, already weighted, and the student outputs."""
        outputs_S = model(**model_inputs(inputs), **self.output_flags())
        terms = {'labels': (1.0 - self.kd_alpha) * self.supervised_loss(outputs_S.logits, inputs['labels'])}
        outputs_T = self.teacher_outputs(inputs) if self.matches else None
        if TEACHER_LOGITS_COLUMN in inputs:
            teacher_logits = inputs[TEACHER_LOGITS_COLUMN]
        elif outputs_T is not None:
            teacher_logits = outputs_T.logits
        else:
            raise ValueError("logit distillation needs the 'teacher_logits' column in the training set")
        terms['logit'] = self.kd_alpha * logit_kd_loss(outputs_S.logits, teacher_logits, self.kd_temperature)
        if outputs_T is not None:
            terms.update(self.feature_terms(outputs_S, outputs_T, inputs.get('attention_mask')))
        return terms, outputs_S

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms, outputs = self.distillation_terms(model, inputs)
        loss = sum(terms.values())
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in self.last_terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0.0) + value
        self.term_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Training logs also show each weighted term's mean since the last log (kd_labels, kd_logit, ...)."""
        if 'loss' in logs and self.term_steps:
            logs.update({f'kd_{name}': round(float(total) / self.term_steps, 4) for name, total in self.term_sums.items()})
            self.term_sums, self.term_steps = {}, 0
        super().log(logs, *args, **kwargs)


def same_token_sequences(student_tokenizer, teacher_tokenizer, texts: Sequence[str], max_length: int) -> bool:
    """True when both tokenizers cut every text into the same token strings (ids may differ, e.g. a student
    whose vocabulary was trimmed from the teacher's): position i of one model is position i of the other."""
    def tokens(tokenizer):
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)['input_ids']
        return [tokenizer.convert_ids_to_tokens(row) for row in ids]
    return bool(texts) and tokens(student_tokenizer) == tokens(teacher_tokenizer)


def distillation_plan(args, student, teacher, student_tokenizer, teacher_tokenizer,
                      train_texts: Sequence[str] = ()) -> Tuple[List[FeatureMatch], bool]:
    """(the intermediate matches of --kd_method, whether both models see the same token positions on the
    training texts: the same tokenizer, or the same token strings under other ids)."""
    aligned = (same_tokenization(student_tokenizer, teacher_tokenizer)
               or same_token_sequences(student_tokenizer, teacher_tokenizer, train_texts, args.max_length))
    features = method_features(args.kd_method)
    if 'attention' in features and not aligned:
        refuse_attention_across_tokenizers(args.kd_method)
    if not features:
        return [], aligned
    pairs = resolve_layer_pairs(args.kd_layer_map, student, teacher)
    matches = KD_METHODS[args.kd_method](pairs, args)
    print(f'[kd] {args.kd_method}: student:teacher layers {", ".join(f"{s}:{t}" for s, t in pairs)}'
          + ('' if aligned else '; different tokenizers: hidden states compared on the first ([CLS]) token only'))
    return matches, aligned


def with_teacher_tokens(student_train, teacher_train):
    """The student's training rows plus the teacher's own tokenization of the same texts."""
    for name in TEACHER_TOKEN_COLUMNS:
        if name in teacher_train.column_names:
            student_train = student_train.add_column(TEACHER_TOKEN_PREFIX + name, teacher_train[name])
    return student_train


def distill_student(student, student_tokenizer, student_splits, teacher, teacher_tokenizer, teacher_splits, data,
                    pos_weight, args, work_dir: str, callbacks: Sequence = ()):
    """Train the student against the labels and the teacher (--kd_method); the best validation epoch's
    weights are restored. Returns (student, trainer); the trainer's model also holds the (unsaved) projections."""
    train_texts = [data.texts[i] for i in data.train_idx]
    matches, aligned = distillation_plan(args, student, teacher, student_tokenizer, teacher_tokenizer, train_texts)
    same_ids = same_tokenization(student_tokenizer, teacher_tokenizer)
    train = student_splits.train
    trainer_kwargs = dict(kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, matches=matches)
    if not matches:
        with main_process_first():   # trained by several processes: computed once (main), read by the others
            logits, _ = cached_teacher_logits(teacher, teacher_tokenizer, teacher_splits.train, data, args.max_length,
                                              args.cache_dir)
        train = train.add_column(TEACHER_LOGITS_COLUMN, logits.tolist())
    else:
        trainer_kwargs.update(teacher=teacher, tokens_aligned=aligned)
        if not same_ids:   # the teacher reads its own token ids of the same texts
            train = with_teacher_tokens(train, teacher_splits.train)
            trainer_kwargs['teacher_tokenizer'] = teacher_tokenizer
    trainer = make_trainer(student, student_tokenizer, train, student_splits.val, pos_weight, args, work_dir,
                           epochs=args.epochs, learning_rate=args.lr, trainer_class=DistillationTrainer,
                           callbacks=callbacks, training_overrides={'remove_unused_columns': False}, **trainer_kwargs)
    run_training(trainer, work_dir)
    return trainer.student, trainer


def trains(settings) -> bool:
    """Distillation always trains (every process of a data-parallel run takes part)."""
    return True


def step(parent, data, settings, out_dir: str) -> Dict:
    """KD: the student (derived from the teacher `parent` with --student_layers, or --student_path) trained on
    the labels and the teacher's soft targets; each model reads its own tokenization of the same texts."""
    teacher_model, teacher_tokenizer = load_trainable_model(parent.path)
    if settings.student_layers:
        student = derive_student_from_teacher(teacher_model, parse_student_layers(settings.student_layers))
        student_tokenizer = teacher_tokenizer
    else:
        student, student_tokenizer = load_encoder_for_classification(settings.student_path, settings.label_columns,
                                                                     settings.dropout)
    # --trim_vocab: the student loses the embedding rows no training text reaches before it trains
    student, student_tokenizer, trim_report = trim_vocabulary_if_asked(student, student_tokenizer, data, settings)
    teacher_splits = tokenized_splits(data, teacher_tokenizer, settings.max_length, settings.cache_dir)
    student_splits = tokenized_splits(data, student_tokenizer, settings.max_length, settings.cache_dir)
    student, _ = distill_student(student, student_tokenizer, student_splits, teacher_model, teacher_tokenizer,
                                 teacher_splits, data, training_pos_weight(data), settings, work_folder(settings, out_dir))
    save_hf(out_dir, student, student_tokenizer, stage_info(settings, 'kd', data))
    return {'linear_roles': linear_weight_roles(student), 'report': trim_report}
