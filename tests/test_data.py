"""Data loading, de-duplication, splits, class weights and the tokenization cache."""

import os

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_CSV
from research_data import (positive_class_weights, prepare_data, split_indices, tokenization_cache_key,
                           tokenize_corpus)

LABELS = ['bully', 'sexual', 'religious', 'threat', 'spam']


def frame_with_duplicates():
    frame = pd.read_csv(SAMPLE_CSV)
    rows = [
        # three copies, bully votes 1,1,0 -> 1; threat votes 0,0,1 -> 0
        {'comment': 'একই মন্তব্য বারবার', 'bully': 1, 'sexual': 0, 'religious': 0, 'threat': 0, 'spam': 0},
        {'comment': 'একই  মন্তব্য বারবার ', 'bully': 1, 'sexual': 0, 'religious': 0, 'threat': 0, 'spam': 0},
        {'comment': 'একই মন্তব্য বারবার', 'bully': 0, 'sexual': 0, 'religious': 0, 'threat': 1, 'spam': 0},
        # two copies that disagree on spam: a tie counts as positive
        {'comment': 'দ্বিধার মন্তব্য', 'bully': 0, 'sexual': 0, 'religious': 0, 'threat': 0, 'spam': 1},
        {'comment': 'দ্বিধার মন্তব্য', 'bully': 0, 'sexual': 0, 'religious': 0, 'threat': 0, 'spam': 0},
        {'comment': None, 'bully': 0, 'sexual': 0, 'religious': 0, 'threat': 0, 'spam': 0},
    ]
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)


def test_duplicates_merged_by_majority_vote_and_never_straddle(tmp_path):
    path = tmp_path / 'd.csv'
    frame_with_duplicates().to_csv(path, index=False)
    data = prepare_data(str(path), 'comment', LABELS, num_folds=5, eval_fold=0, seed=1)
    assert len(data.texts) == len(set(data.texts))
    assert data.stats['rows_dropped_empty'] == 1
    row = data.labels[data.texts.index('একই মন্তব্য বারবার')]
    assert row.tolist() == [1, 0, 0, 0, 0]
    assert data.labels[data.texts.index('দ্বিধার মন্তব্য')].tolist() == [0, 0, 0, 0, 1]
    train = {data.texts[i] for i in data.train_idx} | {data.texts[i] for i in data.val_idx}
    test = {data.texts[i] for i in data.test_idx}
    assert not train & test


def test_same_seed_same_split_and_other_seed_other_split():
    a = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=5, seed=7)
    b = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=5, seed=7)
    c = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=5, seed=8)
    assert np.array_equal(a.test_idx, b.test_idx) and a.test_split_hash == b.test_split_hash
    assert a.test_split_hash != c.test_split_hash


def test_kfold_test_splits_partition_the_data_and_are_stratified():
    data = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1, seed=3)
    tests = [split_indices(data.labels, 4, fold, 0.1, 3)[2] for fold in range(4)]
    joined = np.concatenate(tests)
    assert len(joined) == len(set(joined)) == len(data.labels)
    rates = np.array([data.labels[t].mean(axis=0) for t in tests])
    assert np.all(np.abs(rates - data.labels.mean(axis=0)) < 0.06)  # every fold keeps each label's rate


def test_holdout_split_is_80_20_with_validation_slice():
    data = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1, val_fraction=0.1, seed=3)
    n = len(data.texts)
    assert abs(len(data.test_idx) - 0.2 * n) <= 2
    assert abs(len(data.val_idx) - 0.08 * n) <= 3
    assert len(set(data.train_idx) | set(data.val_idx) | set(data.test_idx)) == n


def test_pos_weight_is_negatives_over_positives():
    labels = np.array([[1, 0], [0, 0], [0, 0], [1, 0]], dtype=np.float32)
    assert positive_class_weights(labels).tolist() == [1.0, 1.0]  # 2/2, and 1 for a label with no positive
    labels[0, 1] = 1
    assert positive_class_weights(labels)[1] == pytest.approx(3.0)


def test_tokenization_cache_is_reused_and_keyed_by_data_tokenizer_and_length(tmp_path, tiny_teacher_dir, tiny_student_dir):
    from transformers import AutoTokenizer
    teacher_tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student_tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    data = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1, seed=3)
    cache = str(tmp_path / 'cache')
    first = tokenize_corpus(data, teacher_tok, 32, cache)
    key = tokenization_cache_key(data, teacher_tok, 32)
    assert os.path.isdir(os.path.join(cache, key))
    marker = os.path.join(cache, key, 'reused.marker')
    open(marker, 'w').close()
    again = tokenize_corpus(data, teacher_tok, 32, cache)
    assert again['input_ids'] == first['input_ids'] and os.path.exists(marker)
    assert tokenization_cache_key(data, student_tok, 32) != key
    assert tokenization_cache_key(data, teacher_tok, 64) != key
    changed = prepare_data(SAMPLE_CSV, 'comment', LABELS, num_folds=1, seed=3)
    changed.labels = changed.labels.copy()
    changed.labels[0, 0] = 1 - changed.labels[0, 0]
    assert tokenization_cache_key(changed, teacher_tok, 32) != key
    assert max(len(ids) for ids in first['input_ids']) <= 32
