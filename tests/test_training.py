"""Teacher training through the Trainer: the best epoch's weights are what comes back."""

import argparse

import numpy as np

from conftest import SAMPLE_CSV
from research_compression_config import parse_compression_arguments


def test_best_weights_are_restored_after_training(tmp_path, tiny_teacher_dir):
    from research_data import positive_class_weights, prepare_data, tokenized_splits
    from research_eval import predict_probabilities, quality_metrics
    from research_inference import TorchClassifier
    from research_models import load_encoder_for_classification
    from research_training import train_classifier
    args = parse_compression_arguments(['--dataset_path', SAMPLE_CSV, '--author_name', 't', '--batch', '16',
                                        '--max_length', '32', '--num_folds', '1', '--early_stopping_patience', '3'])
    data = prepare_data(SAMPLE_CSV, 'comment', args.label_columns, num_folds=1, seed=0)
    model, tokenizer = load_encoder_for_classification(tiny_teacher_dir, args.label_columns, 0.1)
    splits = tokenized_splits(data, tokenizer, 32, str(tmp_path / 'cache'))
    # A high learning rate makes later epochs worse than an earlier one, so restoring matters.
    model, trainer = train_classifier(model, tokenizer, splits.train, splits.val,
                                      positive_class_weights(data.labels[data.train_idx]), args, str(tmp_path / 'w'),
                                      epochs=4, learning_rate=3e-3)
    history = [log['eval_f1_macro'] for log in trainer.state.log_history if 'eval_f1_macro' in log]
    classifier = TorchClassifier(model, tokenizer, args.label_columns, 32, 0.5, {})
    labels, probs = predict_probabilities(classifier, splits.val)
    restored = quality_metrics(labels, probs, args.label_columns)['f1_macro']
    assert restored == max(history) == trainer.state.best_metric
    assert not (tmp_path / 'w').exists()  # checkpoints cleaned up
