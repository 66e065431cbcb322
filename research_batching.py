"""Batches of texts of similar length: the training samplers (`--group_by_length`), length-sorted evaluation
batches whose results are put back in text order, numpy padding of pre-tokenized texts, and the padding
count (real tokens / computed tokens) of the batches a Trainer actually ran.

Lengths come from the tokenization cache's `input_ids`, read from Arrow. (transformers 5's own
`length_column_name` does not help here: with remove_unused_columns the Trainer drops a `length` column
before its sampler reads it, then decodes every row to measure it, at every evaluation too.)

Texts are short and uneven (real data: median 23 tokens, mean 32.6 at --max_length 128), so a random batch
of 32 padded to its longest text computes mostly padding; batches of similar length compute little.
Training keeps randomness: the Trainer's own `get_length_grouped_indices` (random mega-batches of 50
batches, sorted by length inside) with a generator seeded by the run's data seed and the epoch, so an
order never depends on how much of the global RNG other code consumed (a resumed epoch repeats it).
Evaluation is sorted outright; it has no order to keep but the texts', which the callers restore.
"""

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

LENGTH_COLUMN = 'length'


def token_lengths(dataset) -> np.ndarray:
    """Tokens per row of a tokenized `datasets.Dataset` (its `length` column when present, else the lengths
    of `input_ids` read from Arrow, without decoding a row)."""
    import pyarrow.compute as pc
    arrow = dataset.with_format('arrow')
    if LENGTH_COLUMN in dataset.column_names:
        return np.asarray(arrow[LENGTH_COLUMN], dtype=np.int64)
    return pc.list_value_length(arrow['input_ids']).to_numpy(zero_copy_only=False).astype(np.int64)


def length_sorted_order(lengths: Sequence[int]) -> np.ndarray:
    """Row positions, longest first (stable: equal lengths keep text order), so the first batch is the
    largest (an out-of-memory error shows at once) and each batch pads to nearly its own length."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind='stable')


class SeededLengthGroupedSampler(Sampler):
    """transformers' length-grouped order (random mega-batches sorted by length), drawn from a generator
    seeded with `seed + epoch`: the same seed gives the same batches in every process and after a resume."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch) -> None:
        """Called by the Trainer at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class LengthSortedSampler(Sampler):
    """Every row once, longest first: evaluation batches of similar length."""

    def __init__(self, lengths: Sequence[int]):
        self.order = length_sorted_order(lengths).tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


def length_sorted_batches(dataset, tokenizer, batch_size: int) -> Iterator[Tuple[np.ndarray, dict]]:
    """(row positions, padded batch) over a tokenized split in length-sorted order; a caller puts each
    batch's results at its positions (`in_text_order`)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding
    order = length_sorted_order(token_lengths(dataset))
    loader = DataLoader(dataset.select(order, keep_in_memory=True), batch_size=batch_size, shuffle=False,
                        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors='pt'))
    for start, batch in zip(range(0, len(order), batch_size), loader):
        yield order[start:start + batch_size], batch


def in_text_order(parts: Sequence[Tuple[np.ndarray, np.ndarray]], total: int) -> np.ndarray:
    """One array of `total` rows from (positions, rows) parts: row i of the result is text i's."""
    first = parts[0][1]
    result = np.empty((total,) + first.shape[1:], dtype=first.dtype)
    for positions, rows in parts:
        result[positions] = rows
    return result


def pad_token_rows(rows: Dict[str, List[List[int]]], pad_token_id: int, padding_side: str = 'right') -> Dict[str, torch.Tensor]:
    """Tensors of pre-tokenized rows padded to the longest (attention mask 0 and pad id on the padding), the
    same as the tokenizer's `padding=True`, without its per-call overhead."""
    ids = rows['input_ids']
    width = max(len(r) for r in ids)
    batch = {}
    for name, values in rows.items():
        fill = pad_token_id if name == 'input_ids' else 0
        array = np.full((len(values), width), fill, dtype=np.int64)
        for i, row in enumerate(values):
            if padding_side == 'left':
                array[i, width - len(row):] = row
            else:
                array[i, :len(row)] = row
        batch[name] = torch.from_numpy(array)
    return batch


class PaddingCount:
    """What batches computed: `real` tokens (attention mask 1) and `computed` tokens (rows x padded width);
    `efficiency` = real / computed. A count, never a timing."""

    def __init__(self):
        self.real = 0
        self.computed = 0
        self.batches = 0

    def add(self, attention_mask) -> None:
        self.real += int(attention_mask.sum())
        self.computed += int(attention_mask.numel())
        self.batches += 1

    @property
    def efficiency(self) -> Optional[float]:
        return self.real / self.computed if self.computed else None
