"""Pruning: the four pruning methods (magnitude, wanda, gradual, structured), sparsity schedules, structured
importance and plans, sparsity accounting, and fine-tuning after pruning.

Unstructured methods (magnitude, wanda, gradual) zero weights through `torch.nn.utils.prune` masks, so
fine-tuning keeps pruned weights at zero; masks are made permanent before saving. The zeros are still
stored and multiplied: the file is not smaller and PyTorch is not faster. The structured method removes
whole attention heads and FFN neurons, so the matrices get physically smaller (fewer parameters, a
smaller file, lower CPU latency); the surgery itself lives with the model (`research_models.shrink_encoder`)
and such a model is saved in the `hf_structured` format of `research_inference`.

Every method is a small function with one signature, `(model, args, calibration_batches) ->
(model, callbacks)`, registered in `PRUNE_METHODS`; one-shot methods return no callbacks, gradual
pruning returns the `Trainer` callback that prunes while fine-tuning. Schedules are functions
`(t, final_sparsity) -> sparsity` in `PRUNE_SCHEDULES`. `validate(args)` refuses impossible settings before
any training; `step` prunes a stored stage, fine-tunes it and saves the result. The technique never sees
the test split: its before/after diagnostics are scored on the validation split.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import prune
from transformers import TrainerCallback

from research_data import calibration_batches, tokenized_splits
from research_errors import UsageError
from research_eval import macro_f1_of_model
from research_inference import load_trainable_model, save_hf
from research_models import (PRUNE_LAYER_GROUPS, EncoderLayer, encoder_layers, is_structurally_pruned,
                             linear_weight_roles, model_inputs, select_linear_layers, shrink_encoder)
from research_training import SELECTION_THRESHOLD, stage_info, train_classifier, training_pos_weight, trim_vocabulary_if_asked, work_folder


def collect_input_norms(model: nn.Module, layers: Dict[str, nn.Linear], batches: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """‖X_j‖₂ for every input feature j of every layer: the L2 norm over all non-padding calibration
    tokens of that layer's input activations (collected with forward pre-hooks)."""
    device = next(model.parameters()).device
    squares = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device) for name, m in layers.items()}
    current = {}

    def recorder(name):
        def record(_module, inputs):
            x = inputs[0].detach()
            mask = current.get('tokens')
            if x.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask]  # padding positions are not text
            squares[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = model_inputs(batch, device)
                current['tokens'] = inputs['attention_mask'].bool() if 'attention_mask' in inputs else None
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: value.sqrt().float() for name, value in squares.items()}


def _require_calibration(method: str, batches) -> None:
    if not batches:
        raise UsageError(f'--prune_method {method} needs calibration texts from the training split, but none were '
                         'given. Set --calibration_samples to a positive number (default 512).')


# ---------------------------------------------------------------------------------------------
# Methods: (model, args, calibration_batches) -> (model with masks or smaller matrices, Trainer callbacks)
# ---------------------------------------------------------------------------------------------

def apply_magnitude_pruning(model: nn.Module, args, calibration_batches=None):
    """Global magnitude pruning (Han et al. 2015): zero the `sparsity` fraction of smallest |W_ij| across
    all selected Linear layers together (one threshold for the whole group)."""
    layers = select_linear_layers(model, args.prune_layers)
    prune.global_unstructured([(m, 'weight') for m in layers.values()], pruning_method=prune.L1Unstructured,
                              amount=args.prune_sparsity)
    return model, []


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sun et al. 2023 (Wanda): score S_ij = |W_ij|·‖X_j‖₂; in every output row i, the round(sparsity·in)
    lowest-scoring weights get mask 0."""
    scores = weight.detach().abs() * input_norm.to(weight.device).unsqueeze(0)
    mask = torch.ones_like(weight)
    k = int(round(sparsity * weight.shape[1]))
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, 0.0)
    return mask


def apply_wanda_pruning(model: nn.Module, args, calibration_batches=None):
    """Sun et al. 2023 (Wanda): prune by |W_ij|·‖X_j‖₂, with ‖X_j‖₂ measured on `--calibration_samples`
    training texts, compared per output row, no weight update."""
    _require_calibration('wanda', calibration_batches)
    layers = select_linear_layers(model, args.prune_layers)
    norms = collect_input_norms(model, layers, calibration_batches)
    for name, module in layers.items():
        prune.custom_from_mask(module, 'weight', wanda_mask(module.weight, norms[name], args.prune_sparsity))
    return model, []


def gradual_window(args) -> Tuple[float, float]:
    """(start, end) epochs of gradual pruning; end defaults to 2/3 of --fine_tune_epochs."""
    end = args.prune_end_epoch if args.prune_end_epoch is not None else 2.0 * args.fine_tune_epochs / 3.0
    return float(args.prune_start_epoch), float(end)


def apply_gradual_pruning(model: nn.Module, args, calibration_batches=None):
    """Zhu & Gupta 2017: global magnitude pruning whose sparsity rises from 0 to s_f while fine-tuning,
    s_t = schedule(t, s_f) with t = (epoch − start)/(end − start) (e.g. cubic: s_f·(1 − (1 − t)³)); masks
    recomputed every `--prune_frequency` optimizer steps.
    Identity masks are installed now (before the optimizer exists); the returned callback prunes."""
    layers = select_linear_layers(model, args.prune_layers)
    for module in layers.values():
        prune.identity(module, 'weight')
    start, end = gradual_window(args)
    callback = GradualPruningCallback(layers, args.prune_sparsity, PRUNE_SCHEDULES[args.prune_schedule], start, end,
                                      args.prune_frequency)
    return model, [callback]


def apply_structured_pruning(model: nn.Module, args, calibration_batches=None):
    """Remove whole attention heads and FFN neurons with the lowest first-order (Taylor) importance,
    Michel et al. 2019: I_h = E_x |Σ_tokens A_h(x)ᵀ ∂L/∂A_h(x)| for a head's output A_h (scores normalised
    per layer, ranked globally, at least one head kept per layer), and the same score per FFN neuron
    (ranked within its layer, the same number removed in every layer). Removes `--prune_sparsity` of the
    selected encoder Linear weights; the matrices become physically smaller."""
    _require_calibration('structured', calibration_batches)
    layers = encoder_layers(model)
    head_scores, neuron_scores = structured_importance(model, layers, calibration_batches)
    plan = plan_structured_pruning(layers, head_scores, neuron_scores, PRUNE_LAYER_GROUPS[args.prune_layers],
                                   args.prune_sparsity)
    shrink_encoder(model, layers, plan)
    return model, []


PRUNE_METHODS = {
    'magnitude': apply_magnitude_pruning,
    'wanda': apply_wanda_pruning,
    'gradual': apply_gradual_pruning,
    'structured': apply_structured_pruning,
}


def validate(args) -> None:
    """Reject pruning settings that cannot work, naming the fix, before any training."""
    if args.prune_method not in PRUNE_METHODS:
        raise UsageError(f"Unknown --prune_method '{args.prune_method}'. Choose one of: {', '.join(PRUNE_METHODS)}.")
    if not 0.0 < args.prune_sparsity < 1.0:
        raise UsageError(f'--prune_sparsity must be in (0, 1), got {args.prune_sparsity}.')
    if args.prune_frequency < 1:
        raise UsageError('--prune_frequency must be at least 1.')
    if args.fine_tune_after_prune and args.fine_tune_epochs < 1 and args.prune_method != 'gradual':
        raise UsageError(f'--fine_tune_epochs must be at least 1 to fine-tune after pruning, got {args.fine_tune_epochs}. '
                         'To skip fine-tuning, pass --no_fine_tune_after_prune instead.')
    if args.prune_end_epoch is not None and args.prune_end_epoch <= args.prune_start_epoch:
        raise UsageError('--prune_end_epoch must be after --prune_start_epoch.')
    if args.prune_method == 'gradual':
        if not args.fine_tune_after_prune or args.fine_tune_epochs < 1:
            raise UsageError('--prune_method gradual prunes while fine-tuning, so it needs fine-tuning: drop '
                             '--no_fine_tune_after_prune and set --fine_tune_epochs to at least 1.')
        start, end = gradual_window(args)
        if not 0 <= start < end <= args.fine_tune_epochs:
            raise UsageError(f'Gradual pruning must start and reach its target within fine-tuning: need 0 <= '
                             f'--prune_start_epoch ({start:g}) < --prune_end_epoch ({end:g}) <= --fine_tune_epochs '
                             f'({args.fine_tune_epochs}). Adjust those arguments.')
    if args.prune_method == 'structured' and args.prune_layers == 'all':
        raise UsageError("--prune_method structured removes attention heads and FFN neurons, which exist only in "
                         "encoder layers; --prune_layers all would include the pooler. Use --prune_layers encoder, "
                         'attention or ffn.')
    if args.prune_method in ('wanda', 'structured') and args.calibration_samples < 1:
        raise UsageError(f'--prune_method {args.prune_method} needs --calibration_samples of at least 1.')


# ---------------------------------------------------------------------------------------------
# Schedules of gradual pruning: (t in [0, 1], final sparsity s_f) -> sparsity at t
# ---------------------------------------------------------------------------------------------

def _clamp(t: float) -> float:
    return min(max(t, 0.0), 1.0)


def linear_schedule(t: float, final_sparsity: float) -> float:
    """s_t = s_f·t."""
    return final_sparsity * _clamp(t)


def cubic_schedule(t: float, final_sparsity: float) -> float:
    """Zhu & Gupta 2017: s_t = s_f·(1 − (1 − t)³) (prunes fast early, slowly near the end)."""
    return final_sparsity * (1.0 - (1.0 - _clamp(t)) ** 3)


def exponential_schedule(t: float, final_sparsity: float) -> float:
    """s_t = 1 − (1 − s_f)^t: the remaining density decays exponentially, i.e. every equal step of t
    removes the same fraction of the weights still left (as iterative magnitude pruning does, Han et al.
    2015); front-loaded like cubic, but less so (at t=½: linear < exponential < cubic)."""
    return 1.0 - (1.0 - final_sparsity) ** _clamp(t)


PRUNE_SCHEDULES = {
    'linear': linear_schedule,
    'cubic': cubic_schedule,
    'exponential': exponential_schedule,
}


class GradualPruningCallback(TrainerCallback):
    """Raises the sparsity of the selected layers from 0 to `final_sparsity` between `start_epoch` and
    `end_epoch` of fine-tuning, recomputing global magnitude masks every `frequency` optimizer steps (and at
    the first step past `end_epoch`). Pruned weights stay pruned (their masked magnitude is 0). Model
    selection only considers evaluations made at the final sparsity, and early stopping cannot end training
    before it is reached."""

    def __init__(self, layers: Dict[str, nn.Linear], final_sparsity: float, schedule: Callable[[float, float], float],
                 start_epoch: float, end_epoch: float, frequency: int):
        self.layers = layers
        self.final_sparsity = final_sparsity
        self.schedule = schedule
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.frequency = frequency
        self.sparsity = 0.0
        self.history: List[Tuple[int, float, float]] = []  # (step, epoch, sparsity)
        self._best_reset = False

    def target_at(self, epoch: float) -> float:
        return self.schedule((epoch - self.start_epoch) / (self.end_epoch - self.start_epoch), self.final_sparsity)

    @property
    def reached_final(self) -> bool:
        return self.sparsity >= self.final_sparsity - 1e-9

    def prune_to(self, sparsity: float) -> None:
        """Global magnitude pruning of the still-unpruned weights until `sparsity` of the selected weights
        are zero (scores: current |weight_orig·mask|, so already pruned weights stay pruned)."""
        modules = list(self.layers.values())
        total = sum(m.weight_mask.numel() for m in modules)
        pruned = sum(int((m.weight_mask == 0).sum()) for m in modules)
        wanted = int(round(sparsity * total))
        if wanted > pruned:
            scores = {(m, 'weight'): (m.weight_orig * m.weight_mask).detach().abs() for m in modules}
            prune.global_unstructured([(m, 'weight') for m in modules], pruning_method=prune.L1Unstructured,
                                      importance_scores=scores, amount=wanted - pruned)
        self.sparsity = max(self.sparsity, sparsity)

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.frequency == 0
        crossed_end = state.epoch >= self.end_epoch and not self.reached_final
        if due or crossed_end:
            target = self.final_sparsity if crossed_end else self.target_at(state.epoch)
            self.prune_to(target)
            self.history.append((state.global_step, float(state.epoch), self.sparsity))
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.reached_final:
            control.should_training_stop = False  # never stop before the target sparsity is reached
        elif not self._best_reset:
            state.best_metric = None  # earlier (less sparse) epochs may not be restored as "best"
            self._best_reset = True
        return control


# ---------------------------------------------------------------------------------------------
# Structured pruning: importance and plan (the surgery is research_models.shrink_encoder)
# ---------------------------------------------------------------------------------------------

def structured_importance(model: nn.Module, layers: List[EncoderLayer], batches: Sequence[dict]):
    """Michel et al. 2019 head importance and its per-neuron analogue: for each layer, the input X of the
    attention-output projection (concatenated head outputs) and of the FFN-output projection (neuron
    activations) is captured with its gradient of the multi-label BCE loss; a unit's score is
    E_x |Σ_{tokens, its channels} X·∂L/∂X|. Returns (head_scores, neuron_scores), one tensor per layer."""
    device = next(model.parameters()).device
    captured = {}

    def capture(key):
        def hook(_module, inputs):
            x = inputs[0]
            if x.requires_grad:
                x.retain_grad()
            captured[key] = x
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.linear('attention_output').register_forward_pre_hook(capture(('attn', i))))
        handles.append(layer.linear('ffn_out').register_forward_pre_hook(capture(('ffn', i))))
    head_scores = [torch.zeros(layer.num_heads, dtype=torch.float64, device=device) for layer in layers]
    neuron_scores = [torch.zeros(layer.ffn_width, dtype=torch.float64, device=device) for layer in layers]
    examples = 0
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = model(**model_inputs(batch, device)).logits
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), batch['labels'].to(device).float())
            loss.backward()
            for i, layer in enumerate(layers):
                attn, ffn = captured[('attn', i)].detach(), captured[('ffn', i)].detach()
                per_channel = (attn * captured[('attn', i)].grad).sum(dim=1).double()   # [batch, heads * head_size]
                head_scores[i] += per_channel.view(len(per_channel), -1, layer.head_size).sum(-1).abs().sum(0)
                neuron_scores[i] += (ffn * captured[('ffn', i)].grad).sum(dim=1).double().abs().sum(0)
            examples += int(logits.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [s / examples for s in head_scores], [s / examples for s in neuron_scores]


def plan_structured_pruning(layers: List[EncoderLayer], head_scores, neuron_scores, roles: Sequence[str],
                            sparsity: float) -> List[Tuple[List[int], List[int]]]:
    """Which heads and neurons each layer keeps, so that about `sparsity` of the selected weights (q/k/v
    rows + attention-output columns per head, FFN-in row + FFN-out column per neuron) are removed.
    Heads: round(sparsity · all heads) removed, lowest per-layer-normalised score first, at least one kept
    per layer. Neurons: the same count removed in every layer, chosen so that heads + neurons together
    come closest to the target."""
    hidden = layers[0].linear('query').in_features
    head_weights = [4 * hidden * layer.head_size for layer in layers]
    neuron_weights = 2 * hidden
    total = (sum(l.num_heads * w for l, w in zip(layers, head_weights)) if 'attention' in roles else 0) + \
            (sum(l.ffn_width for l in layers) * neuron_weights if 'ffn' in roles else 0)
    removed_heads = [set() for _ in layers]
    if 'attention' in roles:
        normalised = [s / (s.norm() + 1e-12) for s in head_scores]
        ranking = sorted((float(score), i, h) for i, scores in enumerate(normalised) for h, score in enumerate(scores))
        to_remove = int(round(sparsity * sum(l.num_heads for l in layers)))
        for _, i, h in ranking:
            if to_remove == 0:
                break
            if len(removed_heads[i]) < layers[i].num_heads - 1:
                removed_heads[i].add(h)
                to_remove -= 1
    neurons_per_layer = 0
    if 'ffn' in roles:
        budget = sparsity * total - sum(len(r) * w for r, w in zip(removed_heads, head_weights))
        neurons_per_layer = int(round(max(budget, 0.0) / neuron_weights / len(layers)))
        neurons_per_layer = min(neurons_per_layer, min(l.ffn_width for l in layers) - 1)
    plan = []
    for i, layer in enumerate(layers):
        keep_heads = [h for h in range(layer.num_heads) if h not in removed_heads[i]]
        order = torch.argsort(neuron_scores[i], stable=True).tolist()
        keep_neurons = sorted(order[neurons_per_layer:])
        plan.append((keep_heads, keep_neurons))
    return plan


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


def weight_counts(model: nn.Module, group: str) -> Dict[str, int]:
    """Stored weights of the selected Linear layers and stored parameters of the whole model."""
    return {'selected': sum(m.weight.numel() for m in select_linear_layers(model, group).values()),
            'total': sum(p.numel() for p in model.parameters())}


def prune_and_fine_tune(model, tokenizer, splits, pos_weight, args, work_dir: str, data_seed: int):
    """Prune with `--prune_method`, fine-tune (masks held, so pruned weights stay zero; gradual pruning
    happens during this fine-tuning), make the masks permanent. Returns the model and a report: macro-F1 on
    the validation split before pruning, right after pruning (one-shot methods) and after fine-tuning;
    sparsity of the selected layers; and, for every method, the fraction of stored weights removed."""
    def validation_f1(m):
        return macro_f1_of_model(m, tokenizer, splits.val, args.label_columns, args.max_length, SELECTION_THRESHOLD)
    before = weight_counts(model, args.prune_layers)
    report = {'prune_method': args.prune_method, 'prune_layers': args.prune_layers,
              'prune_sparsity_target': args.prune_sparsity, 'f1_macro_split': 'validation',
              'f1_macro_before_pruning': validation_f1(model)}
    needs_calibration = args.prune_method in ('wanda', 'structured')
    batches = calibration_batches(splits.train, tokenizer, args.calibration_samples, args.batch, data_seed) \
        if needs_calibration else None
    model, callbacks = PRUNE_METHODS[args.prune_method](model, args, batches)
    if callbacks:  # gradual: pruning happens while fine-tuning, there is no "right after pruning" model
        report['f1_macro_after_pruning'] = None
        report['sparsity_after_pruning'] = None
    else:
        report['f1_macro_after_pruning'] = validation_f1(model)
        report['sparsity_after_pruning'] = sparsity_of_layers(model, args.prune_layers)
        removed = 1.0 - weight_counts(model, args.prune_layers)['selected'] / before['selected']
        print(f'[prune] {args.prune_method}: {args.prune_layers} weights {report["sparsity_after_pruning"]:.2%} zero, '
              f'{removed:.2%} removed; validation macro-F1 {report["f1_macro_before_pruning"]:.4f} -> '
              f'{report["f1_macro_after_pruning"]:.4f}')
    report['f1_macro_after_fine_tune'] = None
    if trains(args):
        lr = args.fine_tune_lr if args.fine_tune_lr is not None else args.lr / 2
        model = train_classifier(model, tokenizer, splits.train, splits.val, pos_weight, args, work_dir,
                                 epochs=args.fine_tune_epochs, learning_rate=lr, callbacks=callbacks)
        report['f1_macro_after_fine_tune'] = validation_f1(model)
        print(f'[prune] after fine-tuning: validation macro-F1 {report["f1_macro_after_fine_tune"]:.4f}')
    model = make_pruning_permanent(model)
    after = weight_counts(model, args.prune_layers)
    report['sparsity_after_fine_tune'] = sparsity_of_layers(model, args.prune_layers)
    report['weights_removed_pruned_layers'] = 1.0 - after['selected'] / before['selected']
    report['params_removed_overall'] = 1.0 - after['total'] / before['total']
    report['params_total_before_pruning'] = before['total']
    if is_structurally_pruned(model):
        record = model.config.structured_pruning
        report['heads_per_layer'] = record['heads_per_layer']
        report['ffn_width_per_layer'] = record['ffn_width_per_layer']
        print(f'[prune] structured: {report["weights_removed_pruned_layers"]:.2%} of the {args.prune_layers} weights '
              f'removed ({report["params_removed_overall"]:.2%} of all parameters); heads per layer '
              f'{record["heads_per_layer"]}, FFN width per layer {record["ffn_width_per_layer"]}')
    return model, report


def trains(settings) -> bool:
    """Whether the prune step trains (fine-tuning after pruning; gradual pruning happens in it), so that every
    process of a data-parallel run takes part."""
    return bool(settings.fine_tune_after_prune and settings.fine_tune_epochs > 0)


def step(parent, data, settings, out_dir: str) -> Dict:
    """Prune the parent stage (teacher or student), fine-tune with masks held, make masks permanent, save."""
    model, tokenizer = load_trainable_model(parent.path)
    model, tokenizer, trim_report = trim_vocabulary_if_asked(model, tokenizer, data, settings)
    splits = tokenized_splits(data, tokenizer, settings.max_length, settings.cache_dir)
    model, report = prune_and_fine_tune(model, tokenizer, splits, training_pos_weight(data), settings,
                                        work_folder(settings, out_dir), data.split['seed'])
    save_hf(out_dir, model, tokenizer, stage_info(settings, 'prune', data))
    return {'linear_roles': linear_weight_roles(model), 'prune_layers': settings.prune_layers,
            'report': {**trim_report, **report}}
