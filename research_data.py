"""Data: load and validate the CSV, de-duplicate, split (k-fold / holdout), tokenize with an on-disk cache,
batch, and per-label class weights.

Duplicate rule: texts are compared after Unicode NFC normalisation and whitespace collapsing. Every
distinct text becomes one row *before* splitting, so a comment can never sit in both train and test.
When copies of one text disagree, each label is decided by majority vote over the copies, and a tie
counts as positive (a moderation model should rather see a disputed comment as harmful).
"""

import csv
import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from research_distributed import main_process_first
from research_errors import UsageError
from research_files import checksum_problems, folder_checksums, remove_entry, write_json_atomically, written_aside

TOKENIZATION_CACHE_PREFIX = 'tok_'
CACHE_CHECKSUMS = 'checksums.json'   # sha256 of the files of a tokenization cache, written with it

@dataclass
class PreparedData:
    """The cleaned, de-duplicated corpus and one train/validation/test split of it."""
    texts: List[str]
    labels: np.ndarray                 # float32 [n, num_labels], 0/1
    label_names: List[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    fold: int
    stats: Dict[str, int] = field(default_factory=dict)
    split: Dict = field(default_factory=dict)   # the settings that chose the split (num_folds, seed, fractions)

    @property
    def test_split_hash(self) -> str:
        """Identifies the exact test rows, so results from different runs can be checked for the same split."""
        return hashlib.sha256(json.dumps(sorted(self.texts[i] for i in self.test_idx), ensure_ascii=False).encode()).hexdigest()[:16]

    def content_hash(self) -> str:
        """Changes whenever any text or label changes; part of every cache key."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.label_names).encode())
        for text, row in zip(self.texts, self.labels.astype(np.int8)):
            digest.update(text.encode('utf-8'))
            digest.update(row.tobytes())
        return digest.hexdigest()[:16]

    def identity(self) -> str:
        """The data a stage is trained on: content, test split and the exact training/validation rows."""
        return hashlib.sha256(json.dumps([self.content_hash(), self.test_split_hash, self.train_idx.tolist(),
                                          self.val_idx.tolist()]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    return ' '.join(unicodedata.normalize('NFC', text).split())


def load_labeled_csv(path: str, text_column: str, label_columns: Sequence[str]) -> pd.DataFrame:
    """Read the CSV and check the columns and label values; raise UsageError naming the fix."""
    if os.path.isdir(path):
        raise UsageError(f"--dataset_path '{path}' is a folder, not a CSV file. Pass the path of the CSV file itself.")
    if not os.path.isfile(path):
        raise UsageError(f"Dataset file '{path}' does not exist. Pass --dataset_path with the path of a CSV file "
                         f"that has a '{text_column}' text column and the label columns {', '.join(label_columns)}.")
    try:
        frame = pd.read_csv(path, dtype={text_column: str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UsageError(f"Could not read '{path}' as a UTF-8 CSV file ({exc}). Check that it is a comma-separated "
                         'file with a header row.')
    except OSError as exc:      # permissions, an unreadable disk
        raise UsageError(f"Could not read the dataset file '{path}' ({exc.strerror or exc}). Check that it is readable "
                         'by you (e.g. chmod u+r), or copy it somewhere readable and pass that path.')
    refuse_duplicated_header_names(path, [text_column, *label_columns])
    columns = list(frame.columns)
    if text_column not in columns:
        raise UsageError(f"Text column '{text_column}' is not in {path}. Its columns are: {', '.join(map(str, columns))}. "
                         'Pass the right one with --text_column.')
    missing = [c for c in label_columns if c not in columns]
    if missing:
        raise UsageError(f"Label column(s) {', '.join(missing)} not in {path}. Its columns are: "
                         f"{', '.join(map(str, columns))}. Pass the label columns with --label_columns a,b,c.")
    for column in label_columns:
        values = pd.to_numeric(frame[column], errors='coerce')
        bad = frame[column][values.isna() | ~values.isin([0, 1])]
        if len(bad):
            examples = ', '.join(repr(v.item() if isinstance(v, np.generic) else v) for v in bad.unique()[:5])
            raise UsageError(f"Label column '{column}' must hold only 0 and 1, but {len(bad)} row(s) hold other values "
                             f'(e.g. {examples}). Fix or drop those rows, or choose other --label_columns.')
        frame[column] = values.astype(np.int64)
    texts = frame[text_column].dropna()
    if len(texts) and pd.to_numeric(texts, errors='coerce').notna().all():
        raise UsageError(f"Text column '{text_column}' holds only numbers (e.g. {', '.join(map(repr, texts.unique()[:3]))}), "
                         f'not texts. Pass the column that holds the comments with --text_column (the columns of {path} '
                         f"are: {', '.join(map(str, columns))}).")
    return frame[[text_column] + list(label_columns)]


def header_names(path: str) -> List[str]:
    """The names of the header row as written (pandas renames a repeated name `x` to `x.1`, hiding it)."""
    try:
        with open(path, encoding='utf-8-sig', newline='') as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def refuse_duplicated_header_names(path: str, used: Sequence[str]) -> None:
    """A column the run reads must be named once: with two, pandas would read the first and silently rename
    the other `<name>.1`; a name the run asks for that is only such a renaming is no column of the file."""
    names = header_names(path)
    counts = {name: names.count(name) for name in used if names.count(name) > 1}
    if counts:
        listed = ', '.join(f"'{n}' ({c} times)" for n, c in counts.items())
        raise UsageError(f'The header row of {path} names the column(s) {listed} more than once, so it is not clear '
                         'which column holds the data. Rename or remove the extra column(s) in the file, so that '
                         '--text_column and every --label_columns name appears once.')
    renamed = [n for n in used if names and n not in names and re.fullmatch(r'(.+)\.\d+', n)
               and re.fullmatch(r'(.+)\.\d+', n).group(1) in names]
    if renamed:
        raise UsageError(f"{path} has no column named {', '.join(map(repr, renamed))}: that is the name pandas gives a "
                         'repeated header name. Rename the repeated column in the file and pass its new name.')


def clean_and_deduplicate(frame: pd.DataFrame, text_column: str, label_columns: Sequence[str]):
    """Drop empty/NaN texts, merge duplicate texts (majority vote per label, ties positive)."""
    stats = {'rows_read': len(frame)}
    texts = frame[text_column].map(lambda t: normalize_text(t) if isinstance(t, str) else '')
    keep = texts.str.len() > 0
    stats['rows_dropped_empty'] = int((~keep).sum())
    frame = frame.loc[keep].assign(**{text_column: texts[keep]})
    if stats['rows_dropped_empty']:
        print(f'[data] dropped {stats["rows_dropped_empty"]} row(s) with an empty or missing text')
    if frame.empty:
        raise UsageError(f"No rows with a non-empty '{text_column}' remain after cleaning. Check that --text_column "
                         'names the column that holds the comments and that the file is not empty.')
    grouped = frame.groupby(text_column, sort=False)[list(label_columns)]
    votes = grouped.mean()
    merged = (votes >= 0.5).astype(np.float32)
    conflicting = int(((votes > 0) & (votes < 1)).any(axis=1).sum())
    stats['duplicate_rows_merged'] = len(frame) - len(merged)
    stats['texts_with_conflicting_labels'] = conflicting
    stats['unique_texts'] = len(merged)
    print(f'[data] {len(frame)} rows -> {len(merged)} unique texts ({stats["duplicate_rows_merged"]} duplicate rows merged, '
          f'{conflicting} texts had conflicting labels: majority vote per label, ties positive)')
    return list(merged.index), merged.to_numpy(dtype=np.float32), stats


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------

def stratification_target(labels: np.ndarray) -> np.ndarray:
    """What the multilabel stratifiers balance: the labels, plus their complement when there is only one
    (the stratifiers need a multi-label indicator matrix; one 0/1 column would be read as binary)."""
    return labels if labels.shape[1] > 1 else np.hstack([labels, 1 - labels])


def minimum_rows(num_folds: int) -> int:
    return max(2 * num_folds, 10)


def subsample(labels: np.ndarray, fraction: float, seed: int, num_folds: int = 1) -> np.ndarray:
    """Indices of a label-stratified `fraction` of the rows (all rows when fraction == 1)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    kept = int(np.floor(fraction * len(labels)))
    if kept < minimum_rows(num_folds):
        raise UsageError(f'--data_fraction {fraction:g} keeps {kept} of the {len(labels)} usable texts, too few for '
                         f'{num_folds} fold(s) with a validation slice (need at least {minimum_rows(num_folds)}). Raise '
                         f'--data_fraction to at least {min(1.0, minimum_rows(num_folds) / len(labels)):.3g}, or use more data.')
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, train_size=kept, test_size=None, random_state=seed)
    keep, _ = next(splitter.split(np.zeros(len(labels)), stratification_target(labels)))
    return np.sort(keep)


def split_indices(labels: np.ndarray, num_folds: int, eval_fold: int, val_fraction: float, seed: int):
    """(train, val, test) indices: fold `eval_fold` of a multilabel-stratified k-fold is the test split
    (num_folds == 1: a stratified 80/20 holdout); a stratified `val_fraction` of the rest is validation."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
    n = len(labels)
    min_rows = minimum_rows(num_folds)
    labels = stratification_target(labels)
    if n < min_rows:
        raise UsageError(f'Only {n} usable rows remain, too few for {num_folds} fold(s) with a validation slice '
                         f'(need at least {min_rows}). Use more data (raise --data_fraction) or fewer --num_folds.')
    placeholder = np.zeros(n)
    if num_folds == 1:
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)
        rest, test = next(splitter.split(placeholder, labels))
    else:
        folds = list(MultilabelStratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(placeholder, labels))
        rest, test = folds[eval_fold]
    val_splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_pos, val_pos = next(val_splitter.split(np.zeros(len(rest)), labels[rest]))
    return np.sort(rest[train_pos]), np.sort(rest[val_pos]), np.sort(test)


def prepare_data(dataset_path: str, text_column: str, label_columns: Sequence[str], num_folds: int = 5,
                 eval_fold: int = 0, data_fraction: float = 1.0, val_fraction: float = 0.1, seed: int = 42) -> PreparedData:
    """Load, clean, de-duplicate, subsample and split. The same arguments always give the same split."""
    frame = load_labeled_csv(dataset_path, text_column, label_columns)
    texts, labels, stats = clean_and_deduplicate(frame, text_column, label_columns)
    keep = subsample(labels, data_fraction, seed, num_folds)
    texts, labels = [texts[i] for i in keep], labels[keep]
    stats['rows_used'] = len(texts)
    train_idx, val_idx, test_idx = split_indices(labels, num_folds, eval_fold, val_fraction, seed)
    print(f'[data] using {len(texts)} texts: train {len(train_idx)}, validation {len(val_idx)}, test {len(test_idx)} '
          f'(fold {eval_fold + 1}/{num_folds})')
    check_label_coverage(labels, list(label_columns), {'training': train_idx, 'validation': val_idx, 'test': test_idx},
                         eval_fold, num_folds)
    split = {'num_folds': num_folds, 'seed': seed, 'data_fraction': data_fraction, 'val_fraction': val_fraction}
    return PreparedData(texts, labels, list(label_columns), train_idx, val_idx, test_idx, eval_fold, stats, split)


def check_optimizer_steps(data: PreparedData, batch: int, processes: int, accumulation: int) -> None:
    """--gradient_accumulation_steps must fit in an epoch: more than an epoch's batches (of the training split,
    shared out among the data-parallel processes) would leave an optimizer that steps at most once an epoch, its
    warm-up and schedule planned for steps that never come, and an untrained model reported as trained."""
    texts = len(data.train_idx)
    batches = math.ceil(math.ceil(texts / max(processes, 1)) / batch)
    if accumulation > batches:
        shared = f' shared among {processes} processes' if processes > 1 else ''
        raise UsageError(f'--gradient_accumulation_steps {accumulation} is more than the {batches} batch(es) of --batch '
                         f'{batch} that an epoch of the {texts} training texts{shared} has (fold {data.fold}), so the '
                         'optimizer would hardly ever step. Use --gradient_accumulation_steps '
                         f'{max(batches, 1)} or less, or a smaller --batch.')


def check_label_coverage(labels: np.ndarray, label_names: Sequence[str], splits: Dict[str, np.ndarray], fold: int,
                         num_folds: int) -> None:
    """Refuse labels a run cannot learn or score: never positive (or never negative) in the data, or without a
    positive text in the training, validation or test split (its F1 would be a silent 0 in every macro-F1)."""
    positives, total = labels.sum(axis=0), len(labels)
    for j, name in enumerate(label_names):
        if positives[j] == 0 or positives[j] == total:
            value = 'positive' if positives[j] == 0 else 'negative'
            raise UsageError(f"Label '{name}' is never {value} in the {total} texts used, so no model can learn or be "
                             f'scored on it. Drop it from --label_columns (e.g. --label_columns '
                             f"{','.join(n for n in label_names if n != name) or 'OTHER'}), or use data that has both values.")
    where = 'the 80/20 split' if num_folds == 1 else f'test fold {fold + 1}/{num_folds}'
    for split, idx in splits.items():
        missing = [name for j, name in enumerate(label_names) if labels[idx, j].sum() == 0]
        if missing:
            raise UsageError(
                f"The {split} split ({where}: {len(idx)} text{'s' if len(idx) != 1 else ''}) has no positive text for label(s) "
                f"{', '.join(missing)} ({', '.join(f'{n}: {int(positives[label_names.index(n)])}' for n in missing)} "
                f'positive in all {total} texts), so {"it could not be learned" if split == "training" else "its F1 would be a meaningless 0"}. '
                'Use more data (raise --data_fraction), fewer --num_folds (1 = one 80/20 split), or drop the label from '
                '--label_columns.')


def positive_class_weights(labels: np.ndarray) -> np.ndarray:
    """BCE pos_weight per label = negatives / positives on the training rows (1 when a label has no positive)."""
    positives = labels.sum(axis=0)
    negatives = len(labels) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Tokenization with an on-disk cache
# ---------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the token ids: the full backend serialisation (vocab, normaliser,
    pre-tokeniser, post-processor) for fast tokenizers, the vocabulary and settings otherwise."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        # Truncation/padding state is set on the backend by each call; max_length is keyed separately.
        spec = json.loads(backend.to_str())
        spec.pop('truncation', None)
        spec.pop('padding', None)
        digest.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
        digest.update(json.dumps(getattr(tokenizer, 'init_kwargs', {}), sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, 'truncation_side', 'right')).encode())
    return digest.hexdigest()[:16]


def tokenization_cache_key(data: PreparedData, tokenizer, max_length: int) -> str:
    return f'{TOKENIZATION_CACHE_PREFIX}{data.content_hash()}_{tokenizer_fingerprint(tokenizer)}_{max_length}'


def tokenize_corpus(data: PreparedData, tokenizer, max_length: int, cache_dir: Optional[str]):
    """A `datasets.Dataset` of every text (input_ids, attention_mask, labels), unpadded; splits are
    `.select(idx)` of it. Cached on disk under a key of data content, tokenizer and max_length, so a
    changed CSV or tokenizer never reuses a stale cache; a damaged cache is rebuilt."""
    import datasets
    path = os.path.join(cache_dir, tokenization_cache_key(data, tokenizer, max_length)) if cache_dir else None
    if path and os.path.lexists(path):
        cached = read_tokenization_cache(path, data, max_length)
        if cached is not None:
            return cached
    corpus = datasets.Dataset.from_dict({'text': data.texts, 'labels': data.labels.tolist()})

    def encode(batch):
        return tokenizer(batch['text'], truncation=True, max_length=max_length)

    corpus = corpus.map(encode, batched=True, remove_columns=['text'], desc='tokenizing')
    keep = [c for c in corpus.column_names if c in ('input_ids', 'attention_mask', 'token_type_ids', 'labels')]
    corpus = corpus.select_columns(keep)
    if path:
        # Written aside with the checksums of its files, then renamed: a cache is complete or absent.
        try:
            with written_aside(path) as tmp:
                corpus.save_to_disk(tmp)
                write_json_atomically(os.path.join(tmp, CACHE_CHECKSUMS), folder_checksums(tmp))
        except OSError:
            if not os.path.isdir(path):
                raise                     # (else another run wrote the same cache meanwhile; ours was removed)
        corpus = datasets.load_from_disk(path)
    return corpus


def read_tokenization_cache(path: str, data: PreparedData, max_length: int):
    """The cached corpus at `path` when it is intact: its files match the checksums written with it, it reads,
    it has one row per text with this run's labels, and no sequence is empty or longer than max_length.
    Otherwise None, after removing it with one line saying why (the caller rebuilds it)."""
    import datasets
    try:
        with open(os.path.join(path, CACHE_CHECKSUMS), encoding='utf-8') as fh:
            problems = checksum_problems(path, json.load(fh))
        corpus = None if problems else datasets.load_from_disk(path)
        problem = problems[0] if problems else tokenized_corpus_problem(corpus, data, max_length)
    except FileNotFoundError as exc:
        problem = (f'it has no {CACHE_CHECKSUMS} (written by an older version?)' if exc.filename and
                   exc.filename.endswith(CACHE_CHECKSUMS) else f'unreadable ({type(exc).__name__})')
    except Exception as exc:  # a damaged cache fails in many ways: bad JSON, Arrow errors, missing files
        problem = f'unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})'
    if problem is None:
        os.utime(path)                    # last use, for --cache_report and pruning
        return corpus
    print(f'[cache] tokenization cache {os.path.basename(path)}: {problem}: rebuilding')
    remove_entry(path)
    return None


def tokenized_corpus_problem(corpus, data: PreparedData, max_length: int) -> Optional[str]:
    """What is wrong with a tokenized corpus read back for `data` (None when nothing is)."""
    import pyarrow.compute as pc
    if corpus.num_rows != len(data.texts):
        return f'it holds {corpus.num_rows} rows for {len(data.texts)} texts'
    missing = {'input_ids', 'attention_mask', 'labels'} - set(corpus.column_names)
    if missing:
        return f'column(s) {", ".join(sorted(missing))} missing'
    labels = np.asarray(corpus.data.column('labels').to_pylist(), dtype=np.float32)
    if labels.shape != data.labels.shape or not np.array_equal(labels, data.labels):
        return 'its labels differ from the data'
    lengths = pc.list_value_length(corpus.data.column('input_ids')).to_numpy()
    if lengths.min() < 1 or lengths.max() > max_length:
        return f'sequence lengths {lengths.min()}..{lengths.max()} outside 1..{max_length}'
    return None


@dataclass
class TokenizedSplits:
    train: object
    val: object
    test: object


def tokenized_splits(data: PreparedData, tokenizer, max_length: int, cache_dir: Optional[str]) -> TokenizedSplits:
    with main_process_first():   # in a stage trained by several processes: the main one builds the cache
        corpus = tokenize_corpus(data, tokenizer, max_length, cache_dir)
    # Index mappings kept in memory: nothing is written into the cache folder after its checksums.
    return TokenizedSplits(*(corpus.select(idx, keep_in_memory=True) for idx in (data.train_idx, data.val_idx, data.test_idx)))


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def batches_of(dataset, tokenizer, batch_size: int):
    """Padded batches (dicts of tensors) of a tokenized split, in order."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=DataCollatorWithPadding(tokenizer, return_tensors='pt'))


def calibration_batches(dataset, tokenizer, num_samples: int, batch_size: int, seed: int) -> List[dict]:
    """Padded batches (labels included) of `num_samples` training texts drawn with `seed`: what pruning
    scores weights on (wanda's activation norms, structured pruning's gradient importance)."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:min(num_samples, len(dataset))]
    return list(batches_of(dataset.select(np.sort(order)), tokenizer, batch_size))
