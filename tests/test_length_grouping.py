"""Batches of similar length: the seeded length-grouped training sampler (--group_by_length, default on) as the
Trainer runs it, its place in every training stage's identity, and length-sorted evaluation whose results come
back in text order (the same predictions as unsorted batches)."""

import numpy as np
import pytest
import torch

from conftest import LABELS, SAMPLE_CSV, fast_args


@pytest.fixture(scope='module')
def teacher(teacher_checkpoint):
    from research_models import load_fine_tuned_classifier
    return load_fine_tuned_classifier(teacher_checkpoint, LABELS)


@pytest.fixture(scope='module')
def splits(teacher, tmp_path_factory):
    from research_data import prepare_data, tokenized_splits
    data = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1)
    return data, tokenized_splits(data, teacher[1], 32, str(tmp_path_factory.mktemp('cache')))


def batch_efficiency(lengths, order, batch_size):
    lengths = np.asarray(lengths)[list(order)]
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(b.sum() for b in batches) / sum(len(b) * b.max() for b in batches)


def test_sampler_is_seeded_by_seed_and_epoch_and_groups_lengths():
    from research_batching import SeededLengthGroupedSampler
    lengths = np.random.default_rng(0).integers(3, 128, size=2000)
    sampler = SeededLengthGroupedSampler(lengths, batch_size=8, seed=42)
    first = list(sampler)
    assert sorted(first) == list(range(2000))
    assert list(SeededLengthGroupedSampler(lengths, 8, 42)) == first       # same seed, same epoch: same order
    sampler.set_epoch(1)
    assert list(sampler) != first                                          # a new epoch reshuffles
    assert list(SeededLengthGroupedSampler(lengths, 8, 7)) != first
    random_order = np.random.default_rng(1).permutation(2000)
    assert batch_efficiency(lengths, first, 8) > 0.9 > 0.7 > batch_efficiency(lengths, random_order, 8)


def test_group_by_length_is_on_by_default_and_part_of_every_training_stage_identity(tmp_path):
    from research_compression_config import identity_fields, parse_compression_arguments, pipeline_settings
    settings = parse_compression_arguments(fast_args(tmp_path, quant_method='qat'))
    assert settings.group_by_length is True
    assert parse_compression_arguments(fast_args(tmp_path, no_group_by_length=True)).group_by_length is False
    settings = pipeline_settings(settings, 'kd_prune_quant', 42)
    assert all('group_by_length' in identity_fields(settings, kind) for kind in ('teacher', 'kd', 'prune', 'quant'))


class RecordingTrainer:
    """Mixin: the attention-mask row sums of every training batch the Trainer ran."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append(inputs['attention_mask'].sum(dim=1).tolist())
        return super().training_step(model, inputs, *args, **kwargs)


def training_batches(teacher, splits, tmp_path, name, **overrides):
    import copy
    from research_compression_config import parse_compression_arguments, pipeline_settings
    from research_training import MultiLabelTrainer, make_trainer
    settings = pipeline_settings(parse_compression_arguments(fast_args(tmp_path / name, batch=8, **overrides)),
                                 'baseline', 42)
    recording = type('Recording', (RecordingTrainer, MultiLabelTrainer), {'seen': None})
    model = copy.deepcopy(teacher[0])
    trainer = make_trainer(model, teacher[1], splits[1].train, splits[1].val, None, settings, str(tmp_path / name),
                           epochs=1, learning_rate=1e-5, trainer_class=recording)
    trainer.seen = []
    torch.set_num_threads(1)
    trainer.train()
    return trainer.seen, trainer.padding.efficiency


def test_trainer_runs_length_grouped_batches_with_the_same_order_for_the_same_seed(teacher, splits, tmp_path):
    grouped, grouped_efficiency = training_batches(teacher, splits, tmp_path, 'a')
    again, _ = training_batches(teacher, splits, tmp_path, 'b')
    plain, plain_efficiency = training_batches(teacher, splits, tmp_path, 'c', no_group_by_length=True)
    assert grouped == again
    assert sorted(n for b in grouped for n in b) == sorted(n for b in plain for n in b)   # every row, once
    spread = lambda batches: np.mean([max(b) - min(b) for b in batches])
    assert spread(grouped) < spread(plain) / 2
    assert grouped_efficiency > plain_efficiency + 0.1
    # the efficiency the Trainer reports is that of the batches it ran
    assert grouped_efficiency == pytest.approx(sum(map(sum, grouped)) / sum(len(b) * max(b) for b in grouped))


def test_sorted_evaluation_gives_the_unsorted_predictions_in_text_order(teacher, splits):
    from research_data import batches_of
    from research_eval import predict_probabilities
    from research_inference import TorchClassifier, sigmoid
    from research_kd import teacher_logits_on
    model, tokenizer = teacher
    dataset = splits[1].test
    classifier = TorchClassifier(model, tokenizer, LABELS, 32, 0.5, {})
    labels, probs = predict_probabilities(classifier, dataset, batch_size=8)
    naive = [(b.pop('labels').numpy(), sigmoid(classifier.logits(b))) for b in batches_of(dataset, tokenizer, 8)]
    np.testing.assert_array_equal(labels, np.concatenate([n[0] for n in naive]))
    np.testing.assert_allclose(probs, np.concatenate([n[1] for n in naive]), atol=1e-6, rtol=0)
    with torch.inference_mode():
        logits = np.concatenate([model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits.numpy()
                                 for b in batches_of(dataset, tokenizer, 8)])
    np.testing.assert_allclose(teacher_logits_on(model, tokenizer, dataset, batch_size=8), logits, atol=1e-5, rtol=0)
