"""Training shared by every stage: the Hugging Face `Trainer` with multi-label BCE (per-label `pos_weight`),
early stopping on the validation slice, and the best weights restored at the end.

Teacher fine-tuning, distillation, fine-tuning after pruning and QAT all go through `train_classifier`,
so mixed precision, gradient accumulation, clipping and checkpointing behave the same everywhere.
"""

import shutil
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments

from research_eval import quality_metrics


class MultiLabelTrainer(Trainer):
    """`Trainer` whose loss is BCE-with-logits with per-label `pos_weight` (sigmoid outputs, multi-label)."""

    # compute_loss returns a per-batch mean, not a sum normalised by num_items_in_batch, so the Trainer must
    # divide it by the gradient-accumulation steps (transformers 5 would otherwise assume it already did).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, pos_weight: Optional[np.ndarray] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs['labels']
        outputs = model(**model_inputs(inputs))
        loss = self.supervised_loss(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


def model_inputs(batch: dict) -> dict:
    """The tensors a sequence-classification model's forward takes (drops labels and cached extras)."""
    return {k: v for k, v in batch.items() if k in ('input_ids', 'attention_mask', 'token_type_ids')}


def make_validation_metrics(label_names: Sequence[str], threshold: float):
    def compute_metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        probs = 1.0 / (1.0 + np.exp(-logits))
        metrics = quality_metrics(labels, probs, label_names, threshold)
        return {'f1_macro': metrics['f1_macro'], 'f1_micro': metrics['f1_micro']}
    return compute_metrics


def make_training_arguments(args, output_dir: str, epochs: float, learning_rate: float, **overrides) -> TrainingArguments:
    """TrainingArguments from the run's arguments: one checkpoint per epoch, best validation macro-F1 kept."""
    cuda = torch.cuda.is_available()
    use_bf16 = cuda and args.mixed_precision and torch.cuda.is_bf16_supported()
    settings = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=max(args.batch, 64),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=args.weight_decay,
        max_grad_norm=args.gradient_clip_norm,
        eval_strategy='epoch',
        save_strategy='epoch',
        logging_strategy='epoch',
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model='f1_macro',
        greater_is_better=True,
        seed=getattr(args, 'train_seed', args.seed),
        data_seed=getattr(args, 'train_seed', args.seed),
        fp16=cuda and args.mixed_precision and not use_bf16,
        bf16=use_bf16,
        use_cpu=not cuda,
        report_to='none',
        dataloader_num_workers=0,
        disable_tqdm=not getattr(args, 'progress_bars', True),
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train_classifier(model, tokenizer, train_dataset, val_dataset, pos_weight, args, work_dir: str,
                     epochs: float, learning_rate: float, trainer_class=MultiLabelTrainer,
                     callbacks: Sequence = (), training_overrides: Optional[dict] = None, **trainer_kwargs):
    """Fine-tune `model` with early stopping on validation macro-F1 and return it with the best
    epoch's weights restored (the Trainer reloads them at the end). Checkpoints are removed afterwards."""
    training_args = make_training_arguments(args, work_dir, epochs, learning_rate, **(training_overrides or {}))
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_validation_metrics(args.label_columns, args.threshold),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience), *callbacks],
        pos_weight=pos_weight,
        **trainer_kwargs,
    )
    trainer.train()
    best = trainer.state.best_metric
    print(f'[train] best validation macro-F1 {best:.4f} (checkpoint {trainer.state.best_model_checkpoint}) restored')
    shutil.rmtree(work_dir, ignore_errors=True)
    return trainer.model, trainer
