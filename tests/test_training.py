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
    from research_training import make_trainer, run_training
    args = parse_compression_arguments(['--dataset_path', SAMPLE_CSV, '--author_name', 't', '--batch', '16',
                                        '--max_length', '32', '--num_folds', '1', '--early_stopping_patience', '3'])
    data = prepare_data(SAMPLE_CSV, 'comment', args.label_columns, num_folds=1, seed=0)
    model, tokenizer = load_encoder_for_classification(tiny_teacher_dir, args.label_columns, 0.1)
    splits = tokenized_splits(data, tokenizer, 32, str(tmp_path / 'cache'))
    # A high learning rate makes later epochs worse than an earlier one, so restoring matters.
    trainer = make_trainer(model, tokenizer, splits.train, splits.val, positive_class_weights(data.labels[data.train_idx]),
                           args, str(tmp_path / 'w'), epochs=4, learning_rate=3e-3)
    model = run_training(trainer, str(tmp_path / 'w'))
    history = [log['eval_f1_macro'] for log in trainer.state.log_history if 'eval_f1_macro' in log]
    classifier = TorchClassifier(model, tokenizer, args.label_columns, 32, 0.5, {})
    labels, probs = predict_probabilities(classifier, splits.val)
    restored = quality_metrics(labels, probs, args.label_columns)['f1_macro']
    assert restored == max(history) == trainer.state.best_metric
    assert not (tmp_path / 'w').exists()  # checkpoints cleaned up


def test_gradient_accumulation_divides_our_mean_loss(tmp_path, tiny_teacher_dir):
    """Two accumulated half-batches must give the gradient of one full batch: our compute_loss returns a
    per-batch mean, so the Trainer has to divide it by the accumulation steps (transformers 5 skips that
    division for losses it believes are already normalised)."""
    import torch
    from transformers import DataCollatorWithPadding
    from research_data import prepare_data, tokenized_splits
    from research_models import load_encoder_for_classification
    from research_training import MultiLabelTrainer, make_training_arguments
    args = parse_compression_arguments(['--dataset_path', SAMPLE_CSV, '--author_name', 't', '--max_length', '32',
                                        '--num_folds', '1', '--gradient_accumulation_steps', '2'])
    data = prepare_data(SAMPLE_CSV, 'comment', args.label_columns, num_folds=1, seed=0)
    model, tokenizer = load_encoder_for_classification(tiny_teacher_dir, args.label_columns, 0.0)
    for module in model.modules():   # training_step switches to train mode: no dropout, so gradients compare
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    splits = tokenized_splits(data, tokenizer, 32, str(tmp_path / 'cache'))
    collate = DataCollatorWithPadding(tokenizer)
    rows = [{k: v for k, v in splits.train[i].items() if k in ('input_ids', 'attention_mask', 'labels')} for i in range(8)]
    trainer = MultiLabelTrainer(model=model, args=make_training_arguments(args, str(tmp_path / 'w'), 1, 1e-3, eval_strategy='no',
                                                                        load_best_model_at_end=False),
                                data_collator=collate, pos_weight=np.ones(len(args.label_columns)))
    trainer.current_gradient_accumulation_steps = 2   # what the training loop sets
    model.zero_grad()
    for half in (rows[:4], rows[4:]):   # as the training loop calls it: with the items counted over both
        trainer.training_step(model, collate(half), num_items_in_batch=torch.tensor(8 * len(args.label_columns)))
    accumulated = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.train()
    trainer.compute_loss(model, collate(rows)).backward()
    full = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(accumulated) == len(full) > 0
    assert all(torch.allclose(a, f, atol=1e-6, rtol=1e-4) for a, f in zip(accumulated, full))
