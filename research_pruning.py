"""Pruning: layer selection, the pruning methods, sparsity schedules, sparsity accounting and fine-tuning
after pruning. Masks are `torch.nn.utils.prune` masks, so fine-tuning keeps pruned weights at zero, and
they are made permanent before saving.
"""

import re
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from research_errors import MethodNotAvailable

_ENCODER_LAYER = re.compile(r'\.layer\.\d+\.')
HEAD_PREFIXES = ('classifier', 'pre_classifier', 'score', 'qa_outputs')


def linear_role(module_name: str) -> str:
    """'attention' or 'ffn' for Linear layers inside an encoder layer, 'head' for the classification
    head, 'other' for anything else (e.g. the pooler). Works for BERT/ELECTRA/RoBERTa (`encoder.layer.N`)
    and DistilBERT (`transformer.layer.N`) naming."""
    if module_name.split('.')[0] in HEAD_PREFIXES:
        return 'head'
    if not _ENCODER_LAYER.search(f'.{module_name}.'):
        return 'other'
    return 'attention' if 'attention' in module_name else 'ffn'


# --prune_layers name -> roles of the Linear layers it selects (the head is never selected)
PRUNE_LAYER_GROUPS = {
    'encoder': ('attention', 'ffn'),
    'attention': ('attention',),
    'ffn': ('ffn',),
    'all': ('attention', 'ffn', 'other'),
}


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
    return [f'{name}.weight' for name in select_linear_layers(model, group)]


# ---------------------------------------------------------------------------------------------
# Methods: small functions with one signature (model, args, calibration_batches) -> model with masks
# ---------------------------------------------------------------------------------------------

def apply_magnitude_pruning(model: nn.Module, args, calibration_batches=None) -> nn.Module:
    """Global L1 unstructured pruning (Han et al. 2015): zero the `sparsity` fraction of smallest-|w|
    weights across all selected Linear layers together."""
    layers = select_linear_layers(model, args.prune_layers)
    prune.global_unstructured([(m, 'weight') for m in layers.values()], pruning_method=prune.L1Unstructured,
                              amount=args.prune_sparsity)
    return model


def _not_yet(name: str):
    def unavailable(*_args, **_kwargs):
        raise MethodNotAvailable(f"--prune_method {name} is not available in this version: only 'magnitude' is "
                                 'implemented so far. Use --prune_method magnitude.')
    return unavailable


PRUNE_METHODS = {
    'magnitude': apply_magnitude_pruning,
    'wanda': _not_yet('wanda'),
    'gradual': _not_yet('gradual'),
    'structured': _not_yet('structured'),
}


def cubic_schedule(t: float) -> float:
    """Zhu & Gupta 2017: fraction of the final sparsity reached at progress t in [0, 1]: 1 - (1 - t)^3."""
    t = min(max(t, 0.0), 1.0)
    return 1.0 - (1.0 - t) ** 3


def linear_schedule(t: float) -> float:
    """Fraction of the final sparsity at progress t: t."""
    return min(max(t, 0.0), 1.0)


PRUNE_SCHEDULES = {
    'linear': linear_schedule,
    'cubic': cubic_schedule,
    'exponential': linear_schedule,  # replaced by the gradual-pruning work; only used by --prune_method gradual
}


def check_prune_method(name: str) -> None:
    if PRUNE_METHODS[name].__name__ == 'unavailable':
        PRUNE_METHODS[name]()


# ---------------------------------------------------------------------------------------------
# Masks and accounting
# ---------------------------------------------------------------------------------------------

def make_pruning_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (weight = weight_orig * mask) and drop the re-parametrisation."""
    for module in model.modules():
        if prune.is_pruned(module):
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(module, hook._tensor_name)
    return model


def sparsity_of_layers(model: nn.Module, group: str) -> float:
    """Fraction of zero weights over the selected Linear layers (effective weights, masks applied)."""
    weights = [m.weight for m in select_linear_layers(model, group).values()]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


def prune_and_fine_tune(model, tokenizer, splits, pos_weight, args, work_dir: str, calibration_batches=None):
    """Prune with `--prune_method`, fine-tune with the masks in place (pruned weights stay zero), make the
    masks permanent. Returns the model and the sparsity of the selected layers at each step."""
    from research_training import train_classifier
    check_prune_method(args.prune_method)
    model = PRUNE_METHODS[args.prune_method](model, args, calibration_batches)
    report = {'sparsity_after_pruning': sparsity_of_layers(model, args.prune_layers)}
    print(f'[prune] {args.prune_method}: sparsity of {args.prune_layers} layers {report["sparsity_after_pruning"]:.2%}')
    if args.fine_tune_after_prune and args.fine_tune_epochs > 0:
        lr = args.fine_tune_lr if args.fine_tune_lr is not None else args.lr / 2
        model, _ = train_classifier(model, tokenizer, splits.train, splits.val, pos_weight, args, work_dir,
                                    epochs=args.fine_tune_epochs, learning_rate=lr)
    model = make_pruning_permanent(model)
    report['sparsity_after_fine_tune'] = sparsity_of_layers(model, args.prune_layers)
    return model, report
