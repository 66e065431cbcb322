"""Pruning: every method reaches its target on exactly the selected layers, wanda uses activations, the
schedules follow their formulas, fine-tuning keeps pruned weights at zero, and structured pruning really
shrinks the model and reloads with the same predictions."""

import copy
import json
import os

import pytest
import torch

from conftest import SAMPLE_CSV, fast_args, run_cli

GROUPS = ['all', 'attention', 'ffn', 'encoder']


# ---------------------------------------------------------------------------------------------
# Fixtures: the fine-tuned tiny teacher, its data splits, calibration batches
# ---------------------------------------------------------------------------------------------

def make_args(output_dir, **overrides):
    from research_compression_config import parse_compression_arguments
    settings = {'pipeline': 'prune_only', 'calibration_samples': 64}
    settings.update(overrides)
    return parse_compression_arguments(fast_args(output_dir, **settings))


@pytest.fixture(scope='module')
def teacher(teacher_checkpoint):
    from research_models import load_fine_tuned_classifier
    from conftest import LABELS
    return load_fine_tuned_classifier(teacher_checkpoint, LABELS)


@pytest.fixture(scope='module')
def splits(teacher, tmp_path_factory):
    from research_data import prepare_data, tokenized_splits
    data = prepare_data(SAMPLE_CSV, 'comment', ['bully', 'sexual', 'religious', 'threat', 'spam'], num_folds=1)
    return data, tokenized_splits(data, teacher[1], 32, str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def small_splits(splits):
    """The same splits with 96 training texts, so the fine-tuning tests take a few optimizer steps only."""
    from research_data import TokenizedSplits
    data, tokenized = splits
    return data, TokenizedSplits(tokenized.train.select(range(96)), tokenized.val, tokenized.test)


@pytest.fixture(scope='module')
def calibration(teacher, splits):
    from research_pruning import calibration_batches
    return calibration_batches(splits[1].train, teacher[1], 64, 16, seed=0)


def fresh_model(teacher):
    return copy.deepcopy(teacher[0]).eval()


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def effective_weights(model):
    """Every parameter as the model uses it (masks applied), keyed by its plain name."""
    state = state_of(model)
    weights = {k[:-len('_orig')]: v * state[k[:-len('_orig')] + '_mask'] for k, v in state.items() if k.endswith('_orig')}
    weights.update({k: v for k, v in state.items() if not k.endswith(('_orig', '_mask'))})
    return weights


def selected_sparsity(model, group):
    from research_models import select_linear_layers
    weights = [m.weight for m in select_linear_layers(model, group).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def assert_only_selected_changed(model, original, pruned, group):
    """Weights of the selected Linear layers changed; every other tensor (embeddings, LayerNorms, biases,
    unselected Linear layers, the classification head) is bit-for-bit the original."""
    from research_models import selected_weight_names
    selected = set(selected_weight_names(model, group))
    assert selected
    for name, value in original.items():
        if name in selected:
            assert not torch.equal(value, pruned[name]), name
        else:
            assert torch.equal(value, pruned[name]), f'{name} changed but is not in --prune_layers {group}'


# ---------------------------------------------------------------------------------------------
# One-shot unstructured methods: target reached on the selected layers, nothing else touched
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', ['magnitude', 'wanda'])
@pytest.mark.parametrize('group', GROUPS)
@pytest.mark.parametrize('sparsity', [0.3, 0.7])
def test_unstructured_method_hits_target_on_selected_layers_only(teacher, calibration, tmp_path, method, group, sparsity):
    from research_pruning import PRUNE_METHODS
    model = fresh_model(teacher)
    original = state_of(model)
    args = make_args(tmp_path, prune_method=method, prune_layers=group, prune_sparsity=sparsity)
    model, callbacks = PRUNE_METHODS[method](model, args, calibration)
    assert callbacks == []
    assert selected_sparsity(model, group) == pytest.approx(sparsity, abs=0.01)
    assert_only_selected_changed(model, original, effective_weights(model), group)
    assert torch.count_nonzero(model.classifier.weight) == model.classifier.weight.numel()


def test_wanda_prunes_each_output_row_to_the_target(teacher, calibration, tmp_path):
    from research_pruning import PRUNE_METHODS
    model, _ = PRUNE_METHODS['wanda'](fresh_model(teacher), make_args(tmp_path, prune_method='wanda', prune_sparsity=0.5),
                                      calibration)
    weight = model.bert.encoder.layer[1].intermediate.dense.weight
    assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()


def test_wanda_mask_is_the_activation_weighted_score(teacher, calibration, tmp_path):
    """The mask equals |W|·‖X‖₂ per row, with ‖X‖₂ measured here independently over non-padding tokens."""
    from research_pruning import PRUNE_METHODS
    model = fresh_model(teacher)
    layer = model.bert.encoder.layer[2].output.dense
    inputs = []
    current = {}
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0][current['mask']].detach()))
    with torch.no_grad():
        for batch in calibration:
            current['mask'] = batch['attention_mask'].bool()
            model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
    handle.remove()
    norms = torch.cat(inputs).pow(2).sum(0).sqrt()
    scores = layer.weight.detach().abs() * norms
    k = int(round(0.4 * scores.shape[1]))
    expected = torch.ones_like(scores)
    expected.scatter_(1, scores.argsort(dim=1)[:, :k], 0)
    model, _ = PRUNE_METHODS['wanda'](model, make_args(tmp_path, prune_method='wanda', prune_sparsity=0.4), calibration)
    agreement = (layer.weight_mask == expected).float().mean().item()
    assert agreement > 0.999  # ties/float order may flip a handful of equal scores


def test_wanda_mask_differs_from_magnitude_when_activations_are_skewed(teacher, calibration, tmp_path):
    """Make a few input features of layer 0's attention 20x larger (embedding LayerNorm gain): wanda keeps
    nearly all weights reading those features, magnitude pruning (blind to activations) keeps about half."""
    from research_pruning import PRUNE_METHODS
    model = fresh_model(teacher)
    boosted = torch.arange(0, 96, 8)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight[boosted] *= 20.0
        model.bert.embeddings.LayerNorm.bias[boosted] *= 20.0
    args = make_args(tmp_path, prune_layers='attention', prune_sparsity=0.5)
    wanda, _ = PRUNE_METHODS['wanda'](copy.deepcopy(model), args, calibration)
    magnitude, _ = PRUNE_METHODS['magnitude'](copy.deepcopy(model), args, calibration)
    wanda_mask = wanda.bert.encoder.layer[0].attention.self.query.weight_mask
    magnitude_mask = magnitude.bert.encoder.layer[0].attention.self.query.weight_mask
    assert not torch.equal(wanda_mask, magnitude_mask)
    assert wanda_mask[:, boosted].mean() > 0.9        # high-activation inputs kept
    assert magnitude_mask[:, boosted].mean() < 0.7    # magnitude does not see activations


def test_wanda_is_invariant_to_rescaling_that_magnitude_is_not(teacher, calibration, tmp_path):
    """Scale input features up 20x and the weights reading them down 20x (same function): wanda's mask is
    unchanged, magnitude pruning now removes those (small) weights."""
    from research_pruning import PRUNE_METHODS
    args = make_args(tmp_path, prune_layers='attention', prune_sparsity=0.5)
    plain = fresh_model(teacher)
    scaled = fresh_model(teacher)
    boosted = torch.arange(0, 96, 8)
    with torch.no_grad():
        scaled.bert.embeddings.LayerNorm.weight[boosted] *= 20.0
        scaled.bert.embeddings.LayerNorm.bias[boosted] *= 20.0
        for part in ('query', 'key', 'value'):
            getattr(scaled.bert.encoder.layer[0].attention.self, part).weight[:, boosted] /= 20.0
    query = lambda m: m.bert.encoder.layer[0].attention.self.query.weight_mask
    wanda_plain, _ = PRUNE_METHODS['wanda'](copy.deepcopy(plain), args, calibration)
    wanda_scaled, _ = PRUNE_METHODS['wanda'](copy.deepcopy(scaled), args, calibration)
    magnitude_scaled, _ = PRUNE_METHODS['magnitude'](copy.deepcopy(scaled), args, calibration)
    assert (query(wanda_plain) == query(wanda_scaled)).float().mean() > 0.99
    assert query(magnitude_scaled)[:, boosted].mean() < 0.1


# ---------------------------------------------------------------------------------------------
# Gradual pruning: schedules and the Trainer callback
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,expected', [
    ('linear', lambda s: (0.0, s / 2, s)),
    ('cubic', lambda s: (0.0, s * (1 - 0.5 ** 3), s)),
    ('exponential', lambda s: (0.0, 1 - (1 - s) ** 0.5, s)),
])
@pytest.mark.parametrize('final', [0.3, 0.5, 0.9])
def test_schedule_formula_at_0_half_1(name, expected, final):
    from research_pruning import PRUNE_SCHEDULES
    schedule = PRUNE_SCHEDULES[name]
    got = tuple(schedule(t, final) for t in (0.0, 0.5, 1.0))
    assert got == pytest.approx(expected(final), abs=1e-12)
    assert schedule(-1.0, final) == 0.0 and schedule(2.0, final) == pytest.approx(final)


def test_schedules_differ_in_the_middle():
    from research_pruning import PRUNE_SCHEDULES
    mid = {name: f(0.5, 0.5) for name, f in PRUNE_SCHEDULES.items()}
    assert mid['linear'] < mid['exponential'] < mid['cubic']


class FakeState:
    def __init__(self, step, epoch):
        self.global_step, self.epoch, self.best_metric = step, epoch, 0.9


class FakeControl:
    should_training_stop = False


@pytest.mark.parametrize('schedule', ['linear', 'cubic', 'exponential'])
@pytest.mark.parametrize('group', GROUPS)
def test_gradual_callback_follows_schedule_on_selected_layers(teacher, tmp_path, schedule, group):
    """Driven step by step: sparsity at t=0, 1/2, 1 of the window equals the schedule; only the selected
    layers change; masks only grow."""
    from research_pruning import PRUNE_METHODS, PRUNE_SCHEDULES
    model = fresh_model(teacher)
    original = state_of(model)
    args = make_args(tmp_path, prune_method='gradual', prune_layers=group, prune_sparsity=0.6, prune_schedule=schedule,
                     prune_start_epoch=1, prune_end_epoch=3, fine_tune_epochs=4, prune_frequency=1)
    model, (callback,) = PRUNE_METHODS['gradual'](model, args, None)
    previous_zeros = None
    for step, epoch in enumerate([0.5, 1.0, 2.0, 3.0, 3.5], start=1):
        callback.on_step_end(None, FakeState(step, epoch), FakeControl())
        t = (epoch - 1) / 2
        assert selected_sparsity(model, group) == pytest.approx(PRUNE_SCHEDULES[schedule](t, 0.6), abs=0.01)
        zeros = torch.cat([(m.weight_mask == 0).flatten() for m in callback.layers.values()])
        if previous_zeros is not None:
            assert bool((zeros | ~previous_zeros).all())  # once pruned, always pruned
        previous_zeros = zeros
    assert selected_sparsity(model, group) == pytest.approx(0.6, abs=0.01)
    assert_only_selected_changed(model, original, effective_weights(model), group)


def test_gradual_callback_blocks_early_stop_and_stale_best_until_target(teacher, tmp_path):
    from research_pruning import PRUNE_METHODS
    args = make_args(tmp_path, prune_method='gradual', prune_sparsity=0.5, fine_tune_epochs=2, prune_end_epoch=2)
    model, (callback,) = PRUNE_METHODS['gradual'](fresh_model(teacher), args, None)
    control, state = FakeControl(), FakeState(10, 1.0)
    callback.on_step_end(None, state, control)
    control.should_training_stop = True   # as EarlyStoppingCallback would set it
    callback.on_evaluate(None, state, control)
    assert control.should_training_stop is False and state.best_metric == 0.9
    state = FakeState(20, 2.0)
    callback.on_step_end(None, state, control)
    callback.on_evaluate(None, state, control)
    assert state.best_metric is None  # pre-target checkpoints can no longer be restored as "best"


def test_gradual_pruning_inside_trainer(teacher, small_splits, tmp_path):
    """Real fine-tuning: masks are updated during training on the schedule, persist through optimizer
    steps (pruned weights are zero at every later step), and the restored model is at the target."""
    from transformers import TrainerCallback
    from research_data import positive_class_weights
    from research_pruning import PRUNE_METHODS, PRUNE_SCHEDULES, make_pruning_permanent
    from research_training import train_classifier
    data, tokenized = small_splits
    args = make_args(tmp_path, prune_method='gradual', prune_layers='encoder', prune_sparsity=0.5,
                     prune_schedule='cubic', fine_tune_epochs=2, prune_end_epoch=1.5, prune_frequency=2)
    model, callbacks = PRUNE_METHODS['gradual'](fresh_model(teacher), args, None)
    gradual = callbacks[0]
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            modules = list(gradual.layers.values())
            masks = torch.cat([m.weight_mask.flatten() for m in modules])
            effective = torch.cat([(m.weight_orig * m.weight_mask).flatten() for m in modules])
            seen.append((state.global_step, state.epoch, float((masks == 0).float().mean()), masks.clone()))
            assert bool((effective[masks == 0] == 0).all())

    model = train_classifier(model, teacher[1], tokenized.train, tokenized.val,
                                positive_class_weights(data.labels[data.train_idx]), args, str(tmp_path / 'work'),
                                epochs=2, learning_rate=5e-4, callbacks=[*callbacks, Watch()])
    for (_, _, _, before), (_, _, _, after) in zip(seen, seen[1:]):
        assert bool(((after == 0) | (before != 0)).all())  # masks never regrow
    for step, epoch, sparsity, _ in seen:
        if step % 2 == 0:
            expected = PRUNE_SCHEDULES['cubic'](epoch / 1.5, 0.5)
            assert sparsity == pytest.approx(expected, abs=0.01)
    assert seen[-1][2] == pytest.approx(0.5, abs=0.005)
    model = make_pruning_permanent(model)
    assert selected_sparsity(model, 'encoder') == pytest.approx(0.5, abs=0.005)


def test_gradual_needs_fine_tuning_and_a_window_inside_it(tmp_path):
    from research_errors import UsageError
    with pytest.raises(UsageError, match='needs fine-tuning'):
        make_args(tmp_path, prune_method='gradual', no_fine_tune_after_prune=True)
    with pytest.raises(UsageError, match='within fine-tuning'):
        make_args(tmp_path, prune_method='gradual', fine_tune_epochs=2, prune_end_epoch=3)
    with pytest.raises(UsageError, match='encoder layers'):
        make_args(tmp_path, prune_method='structured', prune_layers='all')


# ---------------------------------------------------------------------------------------------
# Fine-tuning after pruning keeps pruned weights at zero; the report has F1 before/after
# ---------------------------------------------------------------------------------------------

def test_fine_tuning_keeps_pruned_weights_zero(teacher, small_splits, tmp_path):
    from torch.nn.utils import prune
    from research_data import positive_class_weights
    from research_pruning import prune_and_fine_tune, select_linear_layers
    data, tokenized = small_splits
    args = make_args(tmp_path, prune_method='magnitude', prune_layers='encoder', prune_sparsity=0.5, fine_tune_epochs=1)
    # The mask magnitude pruning will choose, computed on an independent copy.
    reference = fresh_model(teacher)
    layers = select_linear_layers(reference, 'encoder')
    prune.global_unstructured([(m, 'weight') for m in layers.values()], pruning_method=prune.L1Unstructured, amount=0.5)
    expected_zero = {name: m.weight_mask == 0 for name, m in layers.items()}
    original = {name: m.weight_orig.detach().clone() for name, m in layers.items()}
    model, report = prune_and_fine_tune(fresh_model(teacher), teacher[1], tokenized,
                                        positive_class_weights(data.labels[data.train_idx]), args, str(tmp_path / 'w'),
                                        data.split['seed'])
    moved = 0
    for name, module in select_linear_layers(model, 'encoder').items():
        assert not prune.is_pruned(module)  # masks folded into the weights before saving
        assert bool((module.weight[expected_zero[name]] == 0).all()), name
        kept = ~expected_zero[name]
        moved += int((module.weight[kept] != original[name][kept]).sum())
    assert moved > 0  # fine-tuning did update the surviving weights
    assert report['sparsity_after_fine_tune'] == pytest.approx(0.5, abs=0.005)
    for key in ('f1_macro_before_pruning', 'f1_macro_after_pruning', 'f1_macro_after_fine_tune'):
        assert 0.0 <= report[key] <= 1.0, key
    assert report['f1_macro_split'] == 'validation'   # the technique never sees the test split


# ---------------------------------------------------------------------------------------------
# Structured pruning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('group,sparsity', [('attention', 0.5), ('ffn', 0.3), ('ffn', 0.7), ('encoder', 0.3),
                                            ('encoder', 0.5), ('encoder', 0.7)])
def test_structured_removes_target_share_of_selected_weights(teacher, calibration, tmp_path, group, sparsity):
    from research_pruning import PRUNE_METHODS, select_linear_layers
    model = fresh_model(teacher)
    original = state_of(model)
    before = sum(m.weight.numel() for m in select_linear_layers(model, group).values())
    args = make_args(tmp_path, prune_method='structured', prune_layers=group, prune_sparsity=sparsity)
    model, _ = PRUNE_METHODS['structured'](model, args, calibration)
    after = sum(m.weight.numel() for m in select_linear_layers(model, group).values())
    assert 1 - after / before == pytest.approx(sparsity, abs=0.01)
    pruned = state_of(model)
    for name, value in original.items():  # everything outside the pruned units is untouched
        unit = ('.attention.self.' in name or 'attention.output.dense.weight' in name) if group != 'ffn' else False
        unit = unit or (group != 'attention' and ('intermediate.dense' in name or
                                                   ('.output.dense.weight' in name and 'attention' not in name)))
        if not unit:
            assert torch.equal(value, pruned[name]), name
    record = model.config.structured_pruning
    assert (sum(record['heads_per_layer']) < 16) == (group != 'ffn')
    assert (sum(record['ffn_width_per_layer']) < 4 * 384) == (group != 'attention')


def test_structured_keeps_the_most_important_heads(teacher, calibration, tmp_path):
    """The kept heads are the ones with the highest (normalised) Michel importance."""
    from research_pruning import PRUNE_METHODS, encoder_layers, structured_importance
    model = fresh_model(teacher)
    heads, _ = structured_importance(model, encoder_layers(model), calibration)
    scores = [float(s) for h in heads for s in (h / h.norm())]
    args = make_args(tmp_path, prune_method='structured', prune_layers='attention', prune_sparsity=0.25)
    model, _ = PRUNE_METHODS['structured'](model, args, calibration)
    kept = [layer * 4 + h for layer, hs in enumerate(model.config.structured_pruning['kept_heads']) for h in hs]
    removed = [i for i in range(16) if i not in kept]
    assert len(removed) == 4
    assert max(scores[i] for i in removed) <= min(scores[i] for i in kept) or \
        any(len(hs) == 1 for hs in model.config.structured_pruning['kept_heads'])


def _texts():
    import pandas as pd
    return pd.read_csv(SAMPLE_CSV)['comment'].astype(str).tolist()[:24]


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors='pt')
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize('group', ['encoder', 'ffn'])
def test_structured_model_is_smaller_reloads_and_predicts_the_same(teacher, calibration, tmp_path, group):
    from research_eval import size_on_disk_mb
    from research_inference import load_compressed_model, save_hf
    from research_pruning import PRUNE_METHODS
    model, tokenizer = fresh_model(teacher), teacher[1]
    info = {'stage': 'prune', 'label_names': ['bully', 'sexual', 'religious', 'threat', 'spam'], 'max_length': 32,
            'threshold': 0.5}
    save_hf(str(tmp_path / 'dense'), model, tokenizer, info)
    params_before = sum(p.numel() for p in model.parameters())
    args = make_args(tmp_path / 'args', prune_method='structured', prune_layers=group, prune_sparsity=0.5)
    model, _ = PRUNE_METHODS['structured'](model, args, calibration)
    assert sum(p.numel() for p in model.parameters()) < params_before
    texts = _texts()
    expected = _logits(model, tokenizer, texts)
    saved = save_hf(str(tmp_path / 'pruned'), model, tokenizer, info)
    assert saved['format'] == 'hf_structured'
    assert size_on_disk_mb(str(tmp_path / 'pruned')) < 0.85 * size_on_disk_mb(str(tmp_path / 'dense'))
    reloaded = load_compressed_model(str(tmp_path / 'pruned'))
    assert sum(p.numel() for p in reloaded.model.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.allclose(_logits(reloaded.model, reloaded.tokenizer, texts), expected, atol=1e-5)
    probs = reloaded.predict(texts[:2])
    assert len(probs) == 2 and set(probs[0]) == set(info['label_names'])
    if group == 'ffn':  # uniform FFN width, no head removed: plain Hugging Face loading works too
        from transformers import AutoModelForSequenceClassification
        plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / 'pruned'))
        assert torch.allclose(_logits(plain, tokenizer, texts), expected, atol=1e-5)
    else:
        assert saved['loads_with_from_pretrained'] is False


def test_structured_pipeline_end_to_end(teacher_checkpoint, tmp_path):
    """prune_only with structured pruning through the CLI: the saved stage has fewer parameters, no more
    zeros than before, and the results carry F1 before/after pruning and the removed share."""
    code = run_cli(fast_args(tmp_path / 'out', pipeline='prune_only', teacher_checkpoint=teacher_checkpoint,
                             cache_dir=tmp_path / 'cache', prune_method='structured', prune_sparsity=0.5,
                             calibration_samples=64, save_all_stages=True))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, pruned = json.load(fh)['stages']
    assert pruned['params_total'] < baseline['params_total']
    assert pruned['size_mb'] < baseline['size_mb']
    assert pruned['weights_removed_pruned_layers'] == pytest.approx(0.5, abs=0.01)
    assert pruned['params_removed_overall'] == pytest.approx(1 - pruned['params_total'] / baseline['params_total'], abs=1e-9)
    # Diagnostics inside the technique are scored on the validation split; the test split is the evaluation's.
    assert pruned['f1_macro_split'] == 'validation'
    for key in ('f1_macro_before_pruning', 'f1_macro_after_pruning', 'f1_macro_after_fine_tune'):
        assert 0.0 <= pruned[key] <= 1.0, key
    with open(os.path.join(pruned['model_dir'], 'compression_info.json'), encoding='utf-8') as fh:
        assert json.load(fh)['format'] == 'hf_structured'


def test_a_structurally_pruned_fp16_model_reloads_in_fp16(tmp_path):
    """Structured pruning then fp16 (a search trial did this): the reloaded model is fp16 everywhere and runs."""
    from transformers import BertConfig, BertForSequenceClassification
    from research_models import build_structurally_pruned_model as load_structured_model
    from research_pruning import PRUNE_METHODS
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=96,
                                                     max_position_embeddings=64, num_labels=5)).eval()
    ids = torch.randint(5, 120, (8, 12))
    calibration = [{'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': torch.randint(0, 2, (8, 5)).float()}]
    model, _ = PRUNE_METHODS['structured'](model, make_args(tmp_path, prune_method='structured', prune_sparsity=0.5),
                                           calibration)
    model = model.half()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / 'm'))
    reloaded = load_structured_model(str(tmp_path / 'm'))
    assert {p.dtype for p in reloaded.parameters()} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_structured_works_on_distilbert_layout(tmp_path):
    """DistilBERT names its projections differently (q_lin/k_lin/v_lin/out_lin, ffn.lin1/lin2)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    from research_models import build_structurally_pruned_model as load_structured_model
    from research_pruning import PRUNE_METHODS, select_linear_layers
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=120, dim=48, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64, num_labels=5)).eval()
    ids = torch.randint(5, 120, (8, 12))
    calibration = [{'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': torch.randint(0, 2, (8, 5)).float()}]
    before = sum(m.weight.numel() for m in select_linear_layers(model, 'encoder').values())
    args = make_args(tmp_path, prune_method='structured', prune_sparsity=0.5)
    model, _ = PRUNE_METHODS['structured'](model, args, calibration)
    after = sum(m.weight.numel() for m in select_linear_layers(model, 'encoder').values())
    assert 1 - after / before == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / 'm'))
    reloaded = load_structured_model(str(tmp_path / 'm'))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
