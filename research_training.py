"""Training shared by every stage, and the teacher step.

The Hugging Face `Trainer` with multi-label BCE (per-label `pos_weight`), early stopping on the validation
slice, and the best weights restored at the end. Teacher fine-tuning, distillation, fine-tuning after
pruning and QAT all go through `make_trainer`, so mixed precision, gradient accumulation, clipping and
checkpointing behave the same everywhere; so does reporting (`--report_to`: TensorBoard, W&B, ... through
the Trainer's own integrations, each stage's logs in the folder `settings.log_dir` that research_main gives
it). The teacher step loads `--teacher_checkpoint` (trained head included) or fine-tunes `--teacher_path`.
"""

import json
import os
import shutil
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, ProgressCallback, Trainer, TrainingArguments
from transformers.integrations import INTEGRATION_TO_CALLBACK, TensorBoardCallback, get_available_reporting_integrations
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as transformers_logging

from research_batching import LengthSortedSampler, PaddingCount, SeededLengthGroupedSampler, token_lengths
from research_data import positive_class_weights, tokenized_splits
from research_distributed import barrier, in_all_processes, is_distributed, is_main_process
from research_errors import UsageError
from research_eval import quality_metrics
from research_files import file_is_whole
from research_inference import INFO_FILE, save_hf, sigmoid
from research_model_folders import check_checkpoint_folder, check_model_folder
from research_models import (check_model_source, linear_weight_roles, load_encoder_for_classification,
                             load_fine_tuned_classifier, load_tokenizer, model_inputs)
from research_vocab import check_trimmable, trim_vocabulary


class MultiLabelTrainer(Trainer):
    """`Trainer` whose loss is BCE-with-logits with per-label `pos_weight` (sigmoid outputs, multi-label)."""

    # compute_loss returns a per-batch mean, not a sum normalised by num_items_in_batch, so the Trainer must
    # divide it by the gradient-accumulation steps (transformers 5 would otherwise assume it already did).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, pos_weight: Optional[np.ndarray] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.padding = PaddingCount()   # of the training batches run (research_batching)

    def _get_train_sampler(self, train_dataset=None):
        """--group_by_length: batches of similar length (research_batching), seeded by the data seed and epoch."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != 'group_by_length' or 'input_ids' not in getattr(dataset, 'column_names', ()):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(token_lengths(dataset), self.args.train_batch_size *
                                          self.args.gradient_accumulation_steps, seed)

    def _get_eval_sampler(self, eval_dataset):
        """Validation batches sorted by length (predictions and labels stay paired, so metrics are unchanged)."""
        if 'input_ids' not in getattr(eval_dataset, 'column_names', ()):
            return super()._get_eval_sampler(eval_dataset)
        return LengthSortedSampler(token_lengths(eval_dataset))

    def training_step(self, model, inputs, *args, **kwargs):
        if 'attention_mask' in inputs:
            self.padding.add(inputs['attention_mask'])
        return super().training_step(model, inputs, *args, **kwargs)

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**model_inputs(inputs))
        loss = self.supervised_loss(outputs.logits, inputs['labels'])
        return (loss, outputs) if return_outputs else loss


class TrainingProgressCallback(ProgressCallback):
    """The Trainer's progress bar for the training steps only. A second bar while it runs (one per validation
    pass, transformers' own while a checkpoint is written) is nested under it with cursor-up codes, which
    notebook outputs and log files cannot replay: those bars are left out."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.weight_bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        super().on_train_begin(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.weight_bars:
            transformers_logging.enable_progress_bar()


# Training picks its best epoch (and pruning reports validation F1) at the design note's 0.5, whatever --threshold
# says: decision thresholds are chosen after training, per run, so a threshold sweep reuses the trained stages and
# a stage's identity needs no threshold.
SELECTION_THRESHOLD = 0.5


def make_validation_metrics(label_names: Sequence[str], threshold: float):
    def compute_metrics(eval_pred):
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        metrics = quality_metrics(eval_pred.label_ids, sigmoid(logits), label_names, threshold)
        return {'f1_macro': metrics['f1_macro'], 'f1_micro': metrics['f1_micro']}
    return compute_metrics


# --report_to integrations that need a package, -> the pip install line that provides it
REPORT_TO_PACKAGES = {
    'tensorboard': 'tensorboard', 'wandb': 'wandb', 'mlflow': 'mlflow', 'comet_ml': 'comet_ml', 'neptune': 'neptune',
    'clearml': 'clearml', 'dagshub': 'dagshub mlflow', 'dvclive': 'dvclive', 'codecarbon': 'codecarbon',
    'swanlab': 'swanlab', 'trackio': 'trackio', 'azure_ml': 'azureml-core',
}


def check_report_to(names: Sequence[str]) -> None:
    """Refuse, before any training, an integration the Trainer does not know or that is not installed."""
    known = ['none', 'all', *INTEGRATION_TO_CALLBACK]
    unknown = [n for n in names if n not in known]
    if len(names) > 1 and {'none', 'all'} & set(names):
        raise UsageError(f"--report_to {','.join(names)}: 'none' and 'all' stand alone. Pass --report_to none (no "
                         "integration), --report_to all (every installed one), or a list of integrations without them.")
    if unknown:
        raise UsageError(f"--report_to {','.join(names)}: unknown integration(s) {', '.join(unknown)}. Choose one or more "
                         f"(comma-separated) of: {', '.join(known)}.")
    available = set(get_available_reporting_integrations())
    for name in names:
        if name in REPORT_TO_PACKAGES and name not in available:
            raise UsageError(f"--report_to {name}: the {name} integration is not available here (its package is not "
                             f'installed{" or COMET_API_KEY is not set" if name == "comet_ml" else ""}). Install it with: '
                             f'pip install {REPORT_TO_PACKAGES[name]}  (or leave --report_to at none).')


def make_training_arguments(settings, output_dir: str, epochs: float, learning_rate: float, **overrides) -> TrainingArguments:
    """TrainingArguments from the run's settings: one checkpoint per epoch, best validation macro-F1 kept."""
    cuda = torch.cuda.is_available()
    mixed = settings.mixed_precision and cuda   # read on every machine: it is part of a training stage's identity
    use_bf16 = mixed and torch.cuda.is_bf16_supported()
    arguments = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=settings.batch,
        per_device_eval_batch_size=max(settings.batch, 64),
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.gradient_clip_norm,
        eval_strategy='epoch',
        save_strategy='epoch',
        logging_strategy='epoch',
        save_total_limit=1,
        save_only_model=False,   # optimizer, scheduler, RNG states too: an interrupted stage resumes exactly
        restore_callback_states_from_checkpoint=True,   # ...with its early-stopping counter
        load_best_model_at_end=True,
        metric_for_best_model='f1_macro',
        greater_is_better=True,
        label_names=['labels'],
        seed=settings.train_seed,
        data_seed=settings.train_seed,
        train_sampling_strategy='group_by_length' if settings.group_by_length else 'random',
        fp16=mixed and not use_bf16,
        bf16=use_bf16,
        use_cpu=not cuda,
        report_to=list(settings.report_to),
        run_name=settings.run_name,
        dataloader_num_workers=0,
        disable_tqdm=not settings.progress_bars,
    )
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def make_trainer(model, tokenizer, train_dataset, val_dataset, pos_weight, settings, work_dir: str, epochs: float,
                 learning_rate: float, trainer_class=MultiLabelTrainer, callbacks: Sequence = (),
                 training_overrides: Optional[dict] = None, **trainer_kwargs) -> Trainer:
    """A Trainer with early stopping on validation macro-F1 that restores the best epoch's weights; its
    TensorBoard events (--report_to tensorboard) go to `settings.log_dir`, which outlives `work_dir`."""
    if is_distributed() and not in_all_processes():
        # DDP needs every process in the training loop; one training alone would wait for the others forever.
        raise RuntimeError('a stage trains on the main process alone in a data-parallel run: its technique '
                           "module's trains(settings) must say that it trains")
    trainer = trainer_class(
        model=model,
        args=make_training_arguments(settings, work_dir, epochs, learning_rate, **(training_overrides or {})),
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_validation_metrics(settings.label_columns, SELECTION_THRESHOLD),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience), *callbacks],
        pos_weight=pos_weight,
        **trainer_kwargs,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(TrainingProgressCallback)
    log_dir = settings.log_dir
    for callback in trainer.callback_handler.callbacks:
        if log_dir and isinstance(callback, TensorBoardCallback):
            callback.logging_dir = log_dir   # transformers 5 has no TrainingArguments.logging_dir
    return trainer


TRAINER_STATE_FILE = 'trainer_state.json'   # written last into a checkpoint by the Trainer
OPTIMIZER_FILE = 'optimizer.pt'


def work_folder(settings, out_dir: str) -> str:
    """Where a stage's Trainer keeps its checkpoints: `settings.work_dir` when the run sets it (the stage
    folder's `work/` in the store, shared by every process of a data-parallel run), else `<out_dir>/work`."""
    return settings.work_dir or os.path.join(out_dir, 'work')


# Not transformers' get_last_checkpoint: (5.x) it returns the highest-numbered checkpoint folder even when it is
# incomplete (killed while saving), where this falls back to the newest complete one.
def resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest complete Trainer checkpoint in `work_dir` (its trainer_state.json, written last, and the
    optimizer's state exist), or None. An interrupted attempt of this very stage left it: the store keeps the
    `work/` of a stage folder that no run finished (same key = same settings, parent and data)."""
    if not os.path.isdir(work_dir):
        return None
    steps = []
    for name in os.listdir(work_dir):
        number = name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if name.startswith(PREFIX_CHECKPOINT_DIR + '-') and number.isdigit():
            steps.append((int(number), os.path.join(work_dir, name)))
    for _, path in sorted(steps, reverse=True):
        # with the optimizer's state too: weights alone (an older version's checkpoint) are no honest resume
        if all(os.path.isfile(os.path.join(path, name)) for name in (TRAINER_STATE_FILE, OPTIMIZER_FILE)) \
                and checkpoint_is_whole(path):
            return path
    return None


def checkpoint_is_whole(path: str) -> bool:
    """Every file of the checkpoint written to its end (a full disk or a kill can cut one short while the
    Trainer writes the next)."""
    return all(file_is_whole(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def run_training(trainer: Trainer, work_dir: str):
    """Train (resuming from the last checkpoint an interrupted attempt left in `work_dir`: weights, optimizer,
    scheduler, RNG and early-stopping state), report the restored best epoch, remove the checkpoints; returns
    the trained model."""
    checkpoint = resumable_checkpoint(work_dir)
    if checkpoint:
        with open(os.path.join(checkpoint, TRAINER_STATE_FILE), encoding='utf-8') as fh:
            state = json.load(fh)
        print(f'[train] resuming an interrupted attempt from {checkpoint} (epoch {state.get("epoch") or 0:g}, '
              f'step {state.get("global_step")})')
    trainer.train(resume_from_checkpoint=checkpoint)
    print(f'[train] best validation macro-F1 {trainer.state.best_metric:.4f} '
          f'(checkpoint {trainer.state.best_model_checkpoint}) restored')
    padding = getattr(trainer, 'padding', None)
    if padding is not None and padding.efficiency is not None:
        print(f'[train] padding efficiency {padding.efficiency:.3f} (real / computed tokens of the training batches, '
              f"{'grouped by length' if trainer.args.train_sampling_strategy == 'group_by_length' else 'random order'})")
    if in_all_processes():
        barrier()               # every process has loaded the best checkpoint before it is removed
    if is_main_process():
        shutil.rmtree(work_dir, ignore_errors=True)
    return trainer.model


def train_classifier(model, tokenizer, train_dataset, val_dataset, pos_weight, settings, work_dir: str,
                     epochs: float, learning_rate: float, **trainer_options):
    """Fine-tune `model` with early stopping and return it with the best epoch's weights restored."""
    trainer = make_trainer(model, tokenizer, train_dataset, val_dataset, pos_weight, settings, work_dir, epochs,
                           learning_rate, **trainer_options)
    return run_training(trainer, work_dir)


def training_pos_weight(data) -> np.ndarray:
    return positive_class_weights(data.labels[data.train_idx])


def validate_trimming(settings, model_path: str) -> None:
    """--trim_vocab: the tokenizer of the model to trim (`model_path`) can be rebuilt and holds every
    --trim_vocab_keep token; checked before any training (skipped when the tokenizer cannot be read now: the
    stage that loads the model says why)."""
    if not settings.trim_vocab:
        return
    try:
        tokenizer = load_tokenizer(model_path)
    except UsageError:
        return
    check_trimmable(tokenizer, settings.trim_vocab_keep)


def trim_vocabulary_if_asked(model, tokenizer, data, settings):
    """--trim_vocab: keep only the tokens of the training texts (never validation or test texts), once per
    model: a model whose vocabulary is already trimmed passes through. Returns (model, tokenizer, report)."""
    if not settings.trim_vocab or getattr(model.config, 'vocab_trimmed', False):
        return model, tokenizer, {}
    texts = [data.texts[i] for i in data.train_idx]
    # Whole texts, not truncated ones: WordPiece turns a word into one unknown token when any of its pieces
    # is missing, so a word cut by --max_length must keep its later pieces too.
    model, tokenizer, report = trim_vocabulary(model, tokenizer, texts, None, settings.trim_vocab_min_count,
                                               settings.trim_vocab_keep)
    model.config.vocab_trimmed = True
    print(f'[vocab] trimmed to the training texts: {report["vocab_size_before"]:,} -> {report["vocab_size_after"]:,} '
          f'tokens (min count {settings.trim_vocab_min_count})')
    return model, tokenizer, {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------
# What every stage records about itself (compression_info.json)
# ---------------------------------------------------------------------------------------------

def stage_info(settings, stage: str, data) -> Dict:
    return {'stage': stage, 'label_names': list(settings.label_columns), 'max_length': settings.max_length,
            'threshold': SELECTION_THRESHOLD, 'split': split_record(settings, data)}


def split_record(settings, data) -> Dict:
    """What identifies the data a model was trained on, so a later run can refuse a leaking teacher."""
    return {'data_content_hash': data.content_hash(), 'test_split_hash': data.test_split_hash, 'fold': data.fold,
            'num_folds': data.split['num_folds'], 'seed': data.split['seed'], 'data_fraction': data.split['data_fraction']}


# ---------------------------------------------------------------------------------------------
# The teacher step
# ---------------------------------------------------------------------------------------------

def validate(args) -> None:
    """Teacher settings that cannot work, and the reporting every training shares (--report_to), refused
    before any training: no epochs to fine-tune, a model that cannot be loaded (a missing folder, a hub model
    that cannot be fetched offline), or a --max_length above what the model's position embeddings take (read
    from its config)."""
    if args.teacher_epochs < 1 and not args.teacher_checkpoint:
        raise UsageError(f'--teacher_epochs must be at least 1 to fine-tune the teacher, got {args.teacher_epochs}. '
                         'To skip teacher training, pass an already fine-tuned classifier with --teacher_checkpoint.')
    check_report_to(args.report_to)
    if args.teacher_checkpoint:
        check_checkpoint_folder(args.teacher_checkpoint, args.label_columns)   # whole, trained head, the run's labels
        check_model_source(args.teacher_checkpoint, args.max_length, '--teacher_checkpoint')
    else:
        check_model_folder(args.teacher_path, '--teacher_path')   # config, whole weights and a real tokenizer
        check_model_source(args.teacher_path, args.max_length, '--teacher_path')



def check_teacher_split(settings, data) -> None:
    """A checkpoint fine-tuned by this tool on another split of the same data has seen some of this run's
    test texts; scoring it here would inflate every metric. Refuse unless told otherwise."""
    path = os.path.join(settings.teacher_checkpoint, INFO_FILE)
    if settings.allow_teacher_split_mismatch or not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as fh:
        trained_on = json.load(fh).get('split')
    if trained_on and trained_on['test_split_hash'] != data.test_split_hash:
        raise UsageError(
            f"--teacher_checkpoint '{settings.teacher_checkpoint}' was fine-tuned by this tool with a different split "
            f"(data_fraction={trained_on['data_fraction']}, num_folds={trained_on['num_folds']}, fold={trained_on['fold']}, "
            f"seed={trained_on['seed']}) than this run (data_fraction={data.split['data_fraction']}, "
            f"num_folds={data.split['num_folds']}, fold={data.fold}, seed={data.split['seed']}), so it has seen some of this run's test texts. Use the same "
            'data settings, or pass --allow_teacher_split_mismatch if you know the data are unrelated.')


def trains(settings) -> bool:
    """Whether the teacher step trains (every process of a data-parallel run then takes part)."""
    return not settings.teacher_checkpoint


def step(parent, data, settings, out_dir: str) -> Dict:
    """The fine-tuned teacher: loaded from --teacher_checkpoint (head included), or fine-tuned here."""
    if settings.teacher_checkpoint:
        check_teacher_split(settings, data)
        print(f'[teacher] loading fine-tuned checkpoint {settings.teacher_checkpoint} (training skipped)')
        model, tokenizer = load_fine_tuned_classifier(settings.teacher_checkpoint, settings.label_columns)
    else:
        model, tokenizer = load_encoder_for_classification(settings.teacher_path, settings.label_columns, settings.dropout)
        splits = tokenized_splits(data, tokenizer, settings.max_length, settings.cache_dir)
        print(f'[teacher] fine-tuning {settings.teacher_path} for up to {settings.teacher_epochs} epochs')
        model = train_classifier(model, tokenizer, splits.train, splits.val, training_pos_weight(data), settings,
                                 work_folder(settings, out_dir), settings.teacher_epochs, settings.lr)
    save_hf(out_dir, model, tokenizer, stage_info(settings, 'baseline', data))
    return {'linear_roles': linear_weight_roles(model)}
