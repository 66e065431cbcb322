"""Knowledge distillation: the student (loaded, or derived from the teacher), the distillation losses and
the distillation trainer (a Hugging Face `Trainer` with a distillation `compute_loss`).

Multi-label throughout: soft targets are per-label sigmoids, never a softmax over labels.
"""

from typing import Dict, List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from research_errors import MethodNotAvailable, UsageError
from research_training import MultiLabelTrainer, model_inputs, train_classifier


# ---------------------------------------------------------------------------------------------
# Losses: small pure functions, one registry (see STYLE.md)
# ---------------------------------------------------------------------------------------------

def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 for multi-label outputs: T^2 * BCE(sigmoid(s/T), sigmoid(t/T)), per label."""
    soft_targets = torch.sigmoid(teacher_logits.float() / temperature)
    return temperature ** 2 * F.binary_cross_entropy_with_logits(student_logits.float() / temperature, soft_targets)


def _not_yet(name: str):
    def unavailable(*_args, **_kwargs):
        raise MethodNotAvailable(f"--kd_method {name} is not available in this version: only 'logit' is implemented "
                                 'so far. Use --kd_method logit.')
    return unavailable


# --kd_method name -> function computing the distillation term of one batch
KD_METHODS = {
    'logit': logit_kd_loss,
    'hidden': _not_yet('hidden'),
    'attention': _not_yet('attention'),
    'multi_level': _not_yet('multi_level'),
}


def check_kd_method(name: str) -> None:
    """Fail before any training if the method cannot run."""
    if KD_METHODS[name].__name__ == 'unavailable':
        KD_METHODS[name]()


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------

def uniform_layer_choice(teacher_layers: int, student_layers: int) -> List[int]:
    """Teacher layers kept for an N-layer student, spread uniformly and ending at the top layer
    (TinyBERT's mapping m -> m*L/N, 1-based)."""
    if not 1 <= student_layers <= teacher_layers:
        raise UsageError(f'--student_layers {student_layers} must be between 1 and the teacher depth ({teacher_layers}).')
    return [round((m + 1) * teacher_layers / student_layers) - 1 for m in range(student_layers)]


def derive_student_from_teacher(teacher, layers: Union[int, Sequence[int]]):
    """DistilBERT-style initialisation: a copy of the teacher keeping only the chosen encoder layers
    (embeddings, kept layers, pooler and head copied). Shares the teacher's tokenizer."""
    import copy
    import re
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
# Distillation training
# ---------------------------------------------------------------------------------------------

class DistillationTrainer(MultiLabelTrainer):
    """loss = alpha * KD(student, teacher) + (1 - alpha) * BCE(labels, pos_weight).

    Teacher logits come with each training batch (`teacher_logits`, computed once on the teacher's own
    tokenization of the same texts), so teacher and student may use different tokenizers. Evaluation
    batches carry no teacher logits and are scored on the labels only."""

    def __init__(self, *args, kd_alpha: float, kd_temperature: float, kd_method: str = 'logit', **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.kd_loss = KD_METHODS[kd_method]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**model_inputs(inputs))
        loss = self.supervised_loss(outputs.logits, inputs['labels'])
        if 'teacher_logits' in inputs:
            kd = self.kd_loss(outputs.logits, inputs['teacher_logits'], self.kd_temperature)
            loss = self.kd_alpha * kd + (1.0 - self.kd_alpha) * loss
        return (loss, outputs) if return_outputs else loss


def teacher_logits_on(teacher_classifier, dataset, batch_size: int = 64) -> np.ndarray:
    """Teacher logits for every row of a tokenized split (in the teacher's tokenization)."""
    from research_eval import batches_of
    chunks = []
    for batch in batches_of(dataset, teacher_classifier.tokenizer, batch_size):
        batch.pop('labels', None)
        chunks.append(teacher_classifier.logits(batch))
    return np.concatenate(chunks).astype(np.float32)


def distill_student(student, student_tokenizer, student_splits, teacher_classifier, teacher_train_dataset,
                    pos_weight, args, work_dir: str):
    """Train the student against labels and the teacher's soft targets; best validation weights restored."""
    check_kd_method(args.kd_method)
    teacher_logits = teacher_logits_on(teacher_classifier, teacher_train_dataset)
    train = student_splits.train.add_column('teacher_logits', teacher_logits.tolist())
    student, _ = train_classifier(
        student, student_tokenizer, train, student_splits.val, pos_weight, args, work_dir,
        epochs=args.epochs, learning_rate=args.lr, trainer_class=DistillationTrainer,
        training_overrides={'remove_unused_columns': False},
        kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, kd_method=args.kd_method)
    return student


def count_parameters(model) -> Dict[str, int]:
    return {'params_total': sum(p.numel() for p in model.parameters())}
