"""Knowledge distillation on tiny models whose teacher (4 layers, 96 wide, 4 heads) and students differ in
depth, width, head count and (for one student) tokenizer: every method trains, every setting changes the
loss, alpha=1 ignores the labels and alpha=0 the teacher, projections are trained but never saved, the
layer map and tokenizer rules hold, and the teacher-logit cache is used exactly when it is valid."""

import copy
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from conftest import LABELS, SAMPLE_CSV, fast_args, run_cli

METHODS = ['logit', 'hidden', 'attention', 'multi_level']


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data():
    """The sample CSV's split, cut to 96 training and 32 validation rows to keep the tests fast."""
    from research_data import prepare_data
    prepared = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1)
    return dataclasses.replace(prepared, train_idx=prepared.train_idx[:96], val_idx=prepared.val_idx[:32])


@pytest.fixture(scope='module')
def teacher(tiny_teacher_dir):
    """(model, tokenizer): 4 layers, 96 wide, 4 heads."""
    from research_models import load_encoder_for_classification
    torch.manual_seed(0)
    return load_encoder_for_classification(tiny_teacher_dir, LABELS, 0.1)


def small_student(teacher_tokenizer, seed=1):
    """A student that shares the teacher's tokenizer but has 2 layers, width 48 and 2 heads."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(teacher_tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=128, pad_token_id=teacher_tokenizer.pad_token_id,
                        num_labels=len(LABELS), problem_type='multi_label_classification')
    return BertForSequenceClassification(config)


@pytest.fixture(scope='module')
def other_tokenizer_student(tiny_student_dir):
    """(model, tokenizer): 2 layers, 24 wide, 2 heads, with its own tokenizer."""
    from research_models import load_encoder_for_classification
    torch.manual_seed(2)
    return load_encoder_for_classification(tiny_student_dir, LABELS, 0.1)


def kd_args(tmp_path, **overrides):
    from research_compression_config import parse_compression_arguments
    settings = dict(pipeline='kd_only', epochs=1, batch=16, lr='1e-3', cache_dir=tmp_path / 'cache')
    settings.update(overrides)
    return parse_compression_arguments(fast_args(tmp_path / 'out', **settings))


def splits_of(data, tokenizer, args):
    from research_data import tokenized_splits
    return tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)


def build_trainer(args, student, student_tokenizer, teacher_pair, tmp_path):
    """An untrained DistillationTrainer for --kd_method/--kd_alpha/... of `args` (what distill_student builds)."""
    from transformers import DataCollatorWithPadding
    from research_kd import DistillationTrainer, distillation_plan
    from research_training import make_training_arguments
    teacher_model, teacher_tokenizer = teacher_pair
    matches, aligned = distillation_plan(args, student, teacher_model, student_tokenizer, teacher_tokenizer)
    return DistillationTrainer(model=student, args=make_training_arguments(args, str(tmp_path / 'work'), 1, 1e-3,
                                                                                eval_strategy='no', load_best_model_at_end=False),
                               data_collator=DataCollatorWithPadding(student_tokenizer), pos_weight=np.ones(len(LABELS)),
                               kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, matches=matches,
                               teacher=teacher_model if matches else None, tokens_aligned=aligned,
                               teacher_tokenizer=None if aligned else teacher_tokenizer)


def first_batch(splits, tokenizer, teacher_logits=None, rows=8):
    from research_data import batches_of
    batch = next(iter(batches_of(splits.train.select(range(rows)), tokenizer, rows)))
    if teacher_logits is not None:
        batch['teacher_logits'] = torch.as_tensor(teacher_logits, dtype=torch.float32)
    return batch


def loss_and_grads(trainer, batch):
    """Training-mode loss of one batch (fixed dropout masks) and the gradient of every student parameter."""
    model = trainer.model
    model.train()
    model.zero_grad()
    torch.manual_seed(123)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return float(loss.detach()), grads


def same_grads(a, b, atol=1e-7):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


# ---------------------------------------------------------------------------------------------
# Every method trains (teacher and student differ in depth, width and heads)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
def test_each_method_trains_and_uses_its_terms(tmp_path, data, teacher, method):
    from research_kd import distill_student
    from research_data import positive_class_weights
    teacher_model, teacher_tokenizer = teacher
    args = kd_args(tmp_path, kd_method=method)
    student = small_student(teacher_tokenizer)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    splits = splits_of(data, teacher_tokenizer, args)
    trained, trainer = distill_student(student, teacher_tokenizer, splits, teacher_model, teacher_tokenizer, splits, data,
                                       positive_class_weights(data.labels[data.train_idx]), args, str(tmp_path / 'work'))
    expected = {'labels', 'logit'} | {'hidden': {'hidden'}, 'attention': {'attention'},
                                      'multi_level': {'hidden', 'attention'}}.get(method, set())
    assert set(trainer.last_terms) == expected
    assert all(value > 0 and math.isfinite(value) for value in trainer.last_terms.values())
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any('encoder.layer.0' in n for n in changed) and any('classifier' in n for n in changed)
    # Attention maps needed the eager kernel; the models get their own implementation back afterwards.
    assert trained.config._attn_implementation == 'sdpa'
    assert teacher_model.config._attn_implementation == 'sdpa'


# ---------------------------------------------------------------------------------------------
# The settings change the loss; alpha=1 ignores labels, alpha=0 ignores the teacher
# ---------------------------------------------------------------------------------------------

def test_loss_changes_with_alpha_temperature_and_weights(tmp_path, data, teacher):
    from research_kd import distillation_plan
    teacher_tokenizer = teacher[1]
    student = small_student(teacher_tokenizer)
    base = dict(kd_method='multi_level', kd_alpha=0.7, kd_temperature=4.0, hidden_loss_weight=0.3, attention_loss_weight=0.2)
    variants = {'base': {}, 'alpha': {'kd_alpha': 0.3}, 'temperature': {'kd_temperature': 2.0},
                'hidden_weight': {'hidden_loss_weight': 0.9}, 'attention_weight': {'attention_loss_weight': 0.6}}
    args = kd_args(tmp_path, **base)
    trainer = build_trainer(args, student, teacher_tokenizer, teacher, tmp_path)
    batch = first_batch(splits_of(data, teacher_tokenizer, args), teacher_tokenizer)
    losses = {}
    for name, change in variants.items():
        # The trainer reads the settings as distill_student passes them from the arguments.
        changed = kd_args(tmp_path, **{**base, **change})
        trainer.kd_alpha, trainer.kd_temperature = changed.kd_alpha, changed.kd_temperature
        trainer.matches = distillation_plan(changed, student, teacher[0], teacher_tokenizer, teacher_tokenizer)[0]
        losses[name] = loss_and_grads(trainer, batch)[0]
    for name in variants:
        if name != 'base':
            assert abs(losses[name] - losses['base']) > 1e-5, (name, losses)


def hand_bce(logits, targets):
    """Mean binary cross-entropy written out, -(y log s(z) + (1 - y) log(1 - s(z))), to check the loss against."""
    return float(-(targets * torch.nn.functional.logsigmoid(logits)
                   + (1 - targets) * torch.nn.functional.logsigmoid(-logits)).mean())


def test_the_kd_loss_is_the_label_bce_at_alpha_0_and_t2_soft_bce_at_alpha_1(tmp_path, data, teacher):
    from research_models import model_inputs
    teacher_tokenizer = teacher[1]
    args = kd_args(tmp_path, kd_method='logit', kd_temperature=3.0)
    splits = splits_of(data, teacher_tokenizer, args)
    teacher_logits = torch.as_tensor(np.random.default_rng(1).normal(size=(8, len(LABELS))) * 2, dtype=torch.float32)
    batch = first_batch(splits, teacher_tokenizer, teacher_logits.numpy())
    trainer = build_trainer(args, small_student(teacher_tokenizer), teacher_tokenizer, teacher, tmp_path)
    model = trainer.model
    model.train()
    torch.manual_seed(5)                                        # the same dropout masks in both forwards
    logits = model(**model_inputs(dict(batch))).logits.detach().float()
    labels, temperature = batch['labels'].float(), 3.0
    expected = {0.0: hand_bce(logits, labels),                 # pos_weight is 1 here
                1.0: temperature ** 2 * hand_bce(logits / temperature, torch.sigmoid(teacher_logits / temperature))}
    for alpha, value in expected.items():
        trainer.kd_alpha = alpha
        torch.manual_seed(5)
        with torch.no_grad():
            loss = float(trainer.compute_loss(model, dict(batch)))
        assert loss == pytest.approx(value, abs=1e-6), alpha
    assert abs(expected[0.0] - expected[1.0]) > 1e-3            # the two ends differ, so the check can fail


def test_alpha_one_ignores_labels_and_alpha_zero_ignores_the_teacher(tmp_path, data, teacher):
    from research_training import MultiLabelTrainer
    teacher_tokenizer = teacher[1]
    student = small_student(teacher_tokenizer)
    args = kd_args(tmp_path)
    splits = splits_of(data, teacher_tokenizer, args)
    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(size=(8, len(LABELS)))
    batch = first_batch(splits, teacher_tokenizer, teacher_logits)
    flipped_labels = {**batch, 'labels': 1.0 - batch['labels']}
    other_teacher = {**batch, 'teacher_logits': torch.as_tensor(rng.normal(size=(8, len(LABELS))) * 3, dtype=torch.float32)}

    trainer = build_trainer(args, student, teacher_tokenizer, teacher, tmp_path)

    def trainer_with(alpha):
        trainer.kd_alpha = kd_args(tmp_path, kd_alpha=alpha).kd_alpha
        return trainer

    # alpha = 1: changing the labels changes neither the loss nor any gradient; changing the teacher does.
    t1 = trainer_with(1.0)
    loss, grads = loss_and_grads(t1, batch)
    loss_flipped, grads_flipped = loss_and_grads(t1, flipped_labels)
    assert loss == pytest.approx(loss_flipped, abs=1e-7) and same_grads(grads, grads_flipped)
    assert abs(loss_and_grads(t1, other_teacher)[0] - loss) > 1e-4

    # alpha = 0: changing the teacher's logits changes nothing, and the gradient is plain BCE fine-tuning's.
    t0 = trainer_with(0.0)
    loss, grads = loss_and_grads(t0, batch)
    loss_other, grads_other = loss_and_grads(t0, other_teacher)
    assert loss == pytest.approx(loss_other, abs=1e-7) and same_grads(grads, grads_other)
    plain = MultiLabelTrainer(model=student, args=t0.args, pos_weight=np.ones(len(LABELS)))
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    student_grads = {k[len('student.'):]: v for k, v in grads.items()}   # the trainer's model wraps the student
    assert loss == pytest.approx(plain_loss, abs=1e-6) and same_grads(student_grads, plain_grads, atol=1e-6)
    assert abs(loss_and_grads(t0, flipped_labels)[0] - loss) > 1e-4

    # In between, both matter.
    t_half = trainer_with(0.5)
    loss = loss_and_grads(t_half, batch)[0]
    assert abs(loss_and_grads(t_half, flipped_labels)[0] - loss) > 1e-4
    assert abs(loss_and_grads(t_half, other_teacher)[0] - loss) > 1e-4


# ---------------------------------------------------------------------------------------------
# Projections: trained with the student, never saved with it
# ---------------------------------------------------------------------------------------------

def test_projection_is_trained_and_not_saved(tmp_path, data, teacher):
    from safetensors.numpy import load_file
    from transformers import TrainerCallback
    from research_data import positive_class_weights
    from research_inference import save_hf
    from research_kd import distill_student
    teacher_model, teacher_tokenizer = teacher
    student = small_student(teacher_tokenizer)
    student_ids = {id(p) for p in student.parameters()}
    snapshot = {}

    class SnapshotExtraParameters(TrainerCallback):
        """The optimizer's parameters that are not the student's, as they were when training began."""
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            for group in optimizer.param_groups:
                for p in group['params']:
                    if id(p) not in student_ids:
                        snapshot[id(p)] = p.detach().clone()

    args = kd_args(tmp_path, kd_method='hidden', epochs=2)
    splits = splits_of(data, teacher_tokenizer, args)
    trained, trainer = distill_student(student, teacher_tokenizer, splits, teacher_model, teacher_tokenizer, splits, data,
                                       positive_class_weights(data.labels[data.train_idx]), args, str(tmp_path / 'work'),
                                       callbacks=[SnapshotExtraParameters()])
    projection_params = list(trainer.projections.parameters())
    assert sorted(trainer.projections.keys()) == ['0', '1']                 # one W_h per mapped layer, 48 -> 96
    assert trainer.projections['0'].weight.shape == (96, 48)
    assert {id(p) for p in projection_params} == set(snapshot)               # they were in the optimizer...
    assert all(not torch.equal(p.detach(), snapshot[id(p)]) for p in projection_params)  # ...and were updated
    assert not {id(p) for p in projection_params} & {id(p) for p in trained.parameters()}

    save_hf(str(tmp_path / 'saved'), trained, teacher_tokenizer, {'label_names': LABELS, 'max_length': 32})
    saved = load_file(str(tmp_path / 'saved' / 'model.safetensors'))
    assert not [k for k in saved if 'proj' in k]
    saved_numel = sum(v.size for k, v in saved.items() if 'position_ids' not in k)
    assert saved_numel == sum(p.numel() for p in trained.parameters())


def test_gradient_clipping_covers_the_projections(tmp_path, data, teacher):
    teacher_model, teacher_tokenizer = teacher
    args = kd_args(tmp_path, kd_method='hidden', gradient_clip_norm='0.01')
    trainer = build_trainer(args, small_student(teacher_tokenizer), teacher_tokenizer, teacher, tmp_path)
    batch = first_batch(splits_of(data, teacher_tokenizer, args), teacher_tokenizer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    projection_grads = [p.grad for p in trainer.projections.parameters()]
    assert all(g is not None for g in projection_grads)
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in projection_grads]))) > 0.01
    # The projections are part of the module the Trainer trains, so its own clipping covers them.
    assert {id(p) for p in trainer.projections.parameters()} <= {id(p) for p in trainer.model.parameters()}
    trainer._clip_grad_norm(trainer.model)
    grads = [p.grad for p in [*trainer.student.parameters(), *trainer.projections.parameters()] if p.grad is not None]
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert total == pytest.approx(0.01, rel=1e-3)            # one clip over student + projections


# ---------------------------------------------------------------------------------------------
# Losses exclude padding; attention maps are head-averaged
# ---------------------------------------------------------------------------------------------

def test_hidden_loss_excludes_padding():
    from research_kd_losses import hidden_mse_loss
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = hidden_mse_loss(student, teacher, mask)
    garbage = student.clone()
    garbage[0, 3:] += 100.0
    assert hidden_mse_loss(garbage, teacher, mask) == pytest.approx(float(loss))
    assert hidden_mse_loss(garbage, teacher, None) > loss + 1.0
    real = student.clone()
    real[0, 1] += 1.0
    assert hidden_mse_loss(real, teacher, mask) > loss


def test_attention_loss_excludes_padding_and_compares_head_averaged_maps():
    from types import SimpleNamespace
    from research_kd_losses import attention_kl_loss, head_averaged_attention_of_layer
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])

    def maps(heads):
        scores = torch.randn(2, heads, 4, 4).masked_fill(mask[:, None, None, :] == 0, -1e9)
        return SimpleNamespace(attentions=(torch.softmax(scores, dim=-1),))
    teacher_map = head_averaged_attention_of_layer(maps(4), 0)      # 4 heads -> [2, 4, 4]
    student_map = head_averaged_attention_of_layer(maps(2), 0)      # 2 heads -> [2, 4, 4]
    assert teacher_map.shape == student_map.shape == (2, 4, 4)
    loss = attention_kl_loss(student_map, teacher_map, mask)
    assert loss > 0 and attention_kl_loss(teacher_map, teacher_map, mask) == pytest.approx(0.0, abs=1e-6)
    padded_query = student_map.clone()
    padded_query[0, 3] = torch.tensor([0.97, 0.01, 0.01, 0.01])      # the padding token's own row
    assert attention_kl_loss(padded_query, teacher_map, mask) == pytest.approx(float(loss), abs=1e-6)
    real_query = student_map.clone()
    real_query[0, 0] = torch.tensor([0.97, 0.02, 0.01, 0.0])
    assert attention_kl_loss(real_query, teacher_map, mask) > loss


# ---------------------------------------------------------------------------------------------
# Layer mapping, derived students
# ---------------------------------------------------------------------------------------------

def test_layer_map_default_override_and_errors(teacher):
    from research_errors import UsageError
    from research_kd_losses import default_layer_pairs, parse_layer_map, resolve_layer_pairs
    teacher_model, teacher_tokenizer = teacher
    assert default_layer_pairs(2, 4) == [(0, 1), (1, 3)]                  # TinyBERT uniform, top layer kept
    assert default_layer_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert default_layer_pairs(2, 4, derived_from=[0, 2]) == [(0, 0), (1, 2)]
    assert parse_layer_map('0:1, 1:3,2:5') == [(0, 1), (1, 3), (2, 5)]
    student = small_student(teacher_tokenizer)
    assert resolve_layer_pairs(None, student, teacher_model) == [(0, 1), (1, 3)]
    assert resolve_layer_pairs('0:2,1:0', student, teacher_model) == [(0, 2), (1, 0)]
    for bad in ('0:4', '2:1'):
        with pytest.raises(UsageError, match='out of range'):
            resolve_layer_pairs(bad, student, teacher_model)
    for malformed in ('0-1', '0:1,0:2', 'a:b'):
        with pytest.raises(UsageError):
            parse_layer_map(malformed)


def test_out_of_range_layer_map_exits_2_before_the_teacher_trains(tmp_path, capsys, tiny_teacher_dir, monkeypatch):
    import research_training
    def no_training(*args, **kwargs):
        raise AssertionError('the teacher was trained before the layer map was checked')
    monkeypatch.setattr(research_training, 'train_classifier', no_training)
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_only', kd_method='hidden', teacher_path=tiny_teacher_dir,
                             student_layers=2, kd_layer_map='0:1,1:7', cache_dir=tmp_path / 'cache'))
    assert code == 2
    err = capsys.readouterr().err
    assert 'out of range' in err and 'teacher layers 0..3' in err


def test_malformed_layer_map_exits_2(tmp_path, capsys):
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_only', kd_method='hidden', kd_layer_map='0=1'))
    assert code == 2 and '--kd_layer_map' in capsys.readouterr().err


def test_derived_student_with_listed_layers_maps_to_its_source_layers(tmp_path, data, teacher):
    from research_kd import FeatureMatch, derive_student_from_teacher, resolve_layer_pairs
    teacher_model, teacher_tokenizer = teacher
    student = derive_student_from_teacher(teacher_model, [0, 2])
    assert student.config.num_hidden_layers == 2
    assert torch.equal(student.bert.encoder.layer[1].attention.self.query.weight,
                       teacher_model.bert.encoder.layer[2].attention.self.query.weight)
    assert resolve_layer_pairs(None, student, teacher_model) == [(0, 0), (1, 2)]
    args = kd_args(tmp_path, kd_method='hidden')
    trainer = build_trainer(args, student, teacher_tokenizer, teacher, tmp_path)
    assert len(trainer.projections) == 0                                   # same width: no projection
    batch = first_batch(splits_of(data, teacher_tokenizer, args), teacher_tokenizer)
    student.eval()
    with torch.no_grad():
        outputs_S = student(**{k: batch[k] for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in batch},
                            output_hidden_states=True)
        outputs_T = trainer.teacher_outputs(batch)
    # Student layer 0 is a copy of teacher layer 0 on the same embeddings: identical hidden states.
    trainer.matches = [FeatureMatch('hidden', 0, 0, 'hidden_mse', 1.0)]
    assert float(trainer.feature_terms(outputs_S, outputs_T, batch['attention_mask'])['hidden']) < 1e-10
    trainer.matches = [FeatureMatch('hidden', 0, 1, 'hidden_mse', 1.0)]
    assert float(trainer.feature_terms(outputs_S, outputs_T, batch['attention_mask'])['hidden']) > 1e-3


# ---------------------------------------------------------------------------------------------
# Different tokenizers
# ---------------------------------------------------------------------------------------------

def test_hidden_across_tokenizers_compares_first_token_only(tmp_path, data, teacher, other_tokenizer_student):
    from types import SimpleNamespace
    from research_data import positive_class_weights
    from research_kd import distill_student
    teacher_model, teacher_tokenizer = teacher
    student, student_tokenizer = other_tokenizer_student
    args = kd_args(tmp_path, kd_method='hidden')
    trainer = build_trainer(args, student, student_tokenizer, teacher, tmp_path)
    assert trainer.tokens_aligned is False
    torch.manual_seed(0)
    states_S = tuple(torch.randn(2, 7, 24) for _ in range(3))
    states_T = tuple(torch.randn(2, 9, 96) for _ in range(5))             # other sequence length, width, depth

    def hidden_term(student_states):
        with torch.no_grad():
            return float(trainer.feature_terms(SimpleNamespace(hidden_states=student_states),
                                               SimpleNamespace(hidden_states=states_T), torch.ones(2, 7))['hidden'])
    loss = hidden_term(states_S)
    moved = tuple(s.clone() for s in states_S)
    for s in moved:
        s[:, 1:] += 5.0                                                     # every token but the first
    assert hidden_term(moved) == pytest.approx(loss)
    for s in moved:
        s[:, 0] += 1.0                                                      # the first token counts
    assert hidden_term(moved) > loss * 1.05
    # And it trains end to end, the teacher reading its own tokens.
    student_splits = splits_of(data, student_tokenizer, args)
    teacher_splits = splits_of(data, teacher_tokenizer, args)
    _, trained = distill_student(student, student_tokenizer, student_splits, teacher_model, teacher_tokenizer,
                                 teacher_splits, data, positive_class_weights(data.labels[data.train_idx]), args,
                                 str(tmp_path / 'work'))
    assert trained.last_terms['hidden'] > 0


def test_attention_across_tokenizers_is_refused(tmp_path, data, teacher, other_tokenizer_student, tiny_teacher_dir,
                                                tiny_student_dir, capsys):
    from research_errors import UsageError
    from research_kd import distillation_plan
    student, student_tokenizer = other_tokenizer_student
    for method in ('attention', 'multi_level'):
        with pytest.raises(UsageError, match='different tokenizers'):
            distillation_plan(kd_args(tmp_path, kd_method=method), student, teacher[0], student_tokenizer, teacher[1])
    # The CLI refuses before any training (no teacher fine-tuning happens first).
    code = run_cli(fast_args(tmp_path / 'cli', pipeline='kd_only', kd_method='attention', teacher_path=tiny_teacher_dir,
                             student_path=tiny_student_dir, cache_dir=tmp_path / 'cache'))
    assert code == 2 and 'different tokenizers' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'cli' / 'results_final.json')


# ---------------------------------------------------------------------------------------------
# The teacher-logit cache
# ---------------------------------------------------------------------------------------------

def test_teacher_logit_cache_is_used_and_invalidated(tmp_path, data, teacher):
    from research_data import positive_class_weights
    from research_kd import cached_teacher_logits, distill_student
    teacher_model, teacher_tokenizer = teacher
    teacher_model = copy.deepcopy(teacher_model)
    calls = []
    teacher_model.register_forward_hook(lambda *_: calls.append(1))
    args = kd_args(tmp_path, kd_method='logit', epochs=2)
    splits = splits_of(data, teacher_tokenizer, args)
    pos_weight = positive_class_weights(data.labels[data.train_idx])

    def distill(epochs):
        calls.clear()
        distill_student(small_student(teacher_tokenizer), teacher_tokenizer, splits, teacher_model, teacher_tokenizer,
                        splits, data, pos_weight, argparse_like(args, args.max_length, epochs=epochs),
                        str(tmp_path / 'work'))
        return len(calls)

    # First run: the teacher sees the training rows once (batches of 64), not once per epoch.
    assert distill(epochs=2) == math.ceil(len(data.train_idx) / 64)
    cached = [f for f in os.listdir(args.cache_dir) if f.startswith('teacher_logits_')]
    assert len(cached) == 1
    # Second run: read from disk, the teacher never runs.
    assert distill(epochs=1) == 0

    def lookup(model=teacher_model, tokenizer=teacher_tokenizer, prepared=data, max_length=args.max_length):
        calls.clear()
        train = splits_of(prepared, tokenizer, argparse_like(args, max_length)).train
        logits, hit = cached_teacher_logits(model, tokenizer, train, prepared, max_length, args.cache_dir)
        assert hit == (not calls)
        return logits, hit

    reference, hit = lookup()
    assert hit
    # Changed teacher weights.
    changed_teacher = copy.deepcopy(teacher_model)
    with torch.no_grad():
        changed_teacher.classifier.bias += 0.5
    changed_teacher.register_forward_hook(lambda *_: calls.append(1))
    logits, hit = lookup(model=changed_teacher)
    assert not hit and not np.allclose(logits, reference)
    # Changed data: one label of one text.
    labels = data.labels.copy()
    labels[data.train_idx[0], 0] = 1.0 - labels[data.train_idx[0], 0]
    assert not lookup(prepared=dataclasses.replace(data, labels=labels))[1]
    # Changed training rows (another split of the same texts).
    assert not lookup(prepared=dataclasses.replace(data, train_idx=data.train_idx[1:]))[1]
    # Changed tokenization: max_length, or the tokenizer itself.
    assert not lookup(max_length=args.max_length - 8)[1]
    left_truncating = copy.deepcopy(teacher_tokenizer)
    left_truncating.truncation_side = 'left'
    assert not lookup(tokenizer=left_truncating)[1]
    # Nothing changed: still a hit.
    assert lookup()[1]


def argparse_like(args, max_length, **changes):
    return args.replace(max_length=max_length, **changes)


# ---------------------------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------------------------

def test_cli_multi_level_with_derived_student(tmp_path, teacher_checkpoint):
    import json
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_only', teacher_checkpoint=teacher_checkpoint,
                             student_layers='0,2', kd_method='multi_level', kd_layer_map='0:1,1:3',
                             cache_dir=tmp_path / 'cache'))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, kd = json.load(fh)['stages']
    assert kd['stage'] == 'kd' and kd['params_total'] < baseline['params_total']
    with open(tmp_path / 'out' / 'config.json', encoding='utf-8') as fh:
        assert json.load(fh)['kd_layer_map'] == '0:1,1:3'
