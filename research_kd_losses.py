"""Distillation losses and what they compare, pure torch (no Trainer, no data): the loss functions
(`MATCH_LOSSES`), the features read from a model's outputs (`FEATURES`), the declared intermediate-layer
matches (`FeatureMatch`), the `--kd_method` registry (`KD_METHODS`), the student:teacher layer maps, the
`--student_layers` parser and the learned hidden-state projections.

    loss = alpha * T^2 * BCE(student/T, sigmoid(teacher/T))          (Hinton et al. 2015, per label)
         + (1 - alpha) * BCE(labels, pos_weight)
         + hidden_loss_weight * mean over mapped layers of MSE(W h_S, h_T)       (TinyBERT, Jiao et al. 2020)
         + attention_loss_weight * mean over mapped layers of KL(A_T || A_S)     (MiniLM, Wang et al. 2020)

Multi-label throughout: soft targets are per-label sigmoids, never a softmax over labels. `--kd_method`
picks which intermediate terms are added (`KD_METHODS`); each term is a small loss function with the
signature `(feature_S, feature_T, mask=None)` (`MATCH_LOSSES`), as in TextBrewer.
"""

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from research_errors import UsageError


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
