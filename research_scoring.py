"""Scoring files of new comments with a saved stage folder: the command line of research_inference.py
(`predict` for texts given as arguments, `score` for a file), reading CSV / JSONL / plain text in chunks,
length-sorted batching inside each chunk, and writing one output row per input row in input order.

    python research_inference.py score MODEL_DIR --input comments.csv --output predictions.csv

Memory stays flat: one chunk (--chunk_size rows) is read, scored and written at a time. The output is
written aside and renamed when complete, so an interrupted run leaves no complete-looking file. The
classifier is any `research_inference.CompressedClassifier` (this module never loads one itself).
"""

import argparse
import io
import json
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from research_batching import length_sorted_order, pad_token_rows
from research_errors import UsageError
from research_files import remove_entry, temporary_path

INPUT_FORMATS = {'.csv': 'csv', '.jsonl': 'jsonl', '.ndjson': 'jsonl', '.txt': 'txt', '.text': 'txt'}
TEXT_FILE_COLUMN = 'text'              # the one column of a plain-text input
PROBABILITY_PREFIX = 'prob_'
PREDICTED_COLUMN = 'predicted_labels'  # labels at or above their threshold, comma-separated


# ---------------------------------------------------------------------------------------------
# Command line (research_inference.main runs it)
# ---------------------------------------------------------------------------------------------

def build_inference_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='research_inference.py',
        description='Predict with a saved stage folder (any format: fp32, pruned, fp16/bf16, int8/int4 ONNX, NF4). '
                    'The old form `research_inference.py MODEL_DIR "text" ...` still means `predict`.')
    commands = parser.add_subparsers(dest='command', required=True)
    predict = commands.add_parser('predict', help='Print one JSON line of label probabilities per text argument.',
                                  description='One JSON object per text: labels at or above the folder\'s threshold(s) '
                                              'and every label\'s probability.')
    predict.add_argument('model_dir', metavar='MODEL_DIR', help='A saved stage folder (holds compression_info.json).')
    predict.add_argument('texts', metavar='TEXT', nargs='+', help='Texts to classify.')
    predict.add_argument('--device', default=None, help='Put a PyTorch model on this device (e.g. cuda); default CPU. '
                         'ONNX models run on the CPU, bitsandbytes NF4/FP4 models on the GPU.')
    score = commands.add_parser('score', help='Score a CSV / JSONL / text file of comments, streaming it in chunks.',
                                description='Writes one row per input row, in input order: the input\'s columns, '
                                            f'{PROBABILITY_PREFIX}<label> per label and {PREDICTED_COLUMN} at the '
                                            'folder\'s thresholds. Empty texts keep their row with empty cells.')
    score.add_argument('model_dir', metavar='MODEL_DIR', help='A saved stage folder (holds compression_info.json).')
    score.add_argument('--input', required=True, help='CSV, JSONL (.jsonl/.ndjson) or plain text (.txt, one text a '
                       'line), UTF-8; - reads standard input (CSV unless --input_format says otherwise).')
    score.add_argument('--output', required=True, help='Where to write the predictions (.jsonl: JSON lines, else CSV); '
                       '- writes to standard output.')
    score.add_argument('--input_format', choices=sorted(set(INPUT_FORMATS.values())), default=None,
                       help='Format of --input (default: from its extension; CSV for -).')
    score.add_argument('--text_column', default='comment', help='Column (CSV) or key (JSONL) holding the texts; a '
                       f'plain-text file\'s one column is `{TEXT_FILE_COLUMN}`. Default: comment.')
    score.add_argument('--batch_size', type=int, default=64, help='Texts per forward pass, >= 1 (default 64).')
    score.add_argument('--chunk_size', type=int, default=10000, help='Rows read, sorted by length and written at a '
                       'time, >= 1 (default 10000); memory grows with it, not with the file.')
    score.add_argument('--threads', type=int, default=None, help='Intra-op threads of PyTorch / ONNX Runtime, >= 1 '
                       '(default: the runtime\'s own choice).')
    score.add_argument('--device', default=None, help='As for predict.')
    score.add_argument('--no_progress', action='store_false', dest='progress', help='No progress bar.')
    return parser


def parse_inference_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The subcommand's arguments; an argument list that starts with neither `predict`, `score` nor a help
    flag is the old form and means `predict`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ('predict', 'score', '-h', '--help'):
        argv = ['predict'] + argv
    args = build_inference_parser().parse_args(argv)
    for name in ('batch_size', 'chunk_size', 'threads'):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f'--{name} must be at least 1, got {value}.')
    return args


def label_thresholds(classifier) -> Dict[str, float]:
    """Label -> decision threshold: the folder's per-label `thresholds` (tuned on validation) when it has
    them, else its single `threshold` for every label."""
    return {name: float(classifier.thresholds[name]) for name in classifier.label_names}


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------

def input_format(path: str, requested: Optional[str]) -> str:
    if requested:
        return requested
    if path == '-':
        return 'csv'
    extension = os.path.splitext(path)[1].lower()
    if extension not in INPUT_FORMATS:
        raise UsageError(f"--input '{path}': cannot tell its format from the extension '{extension}'. Name it .csv, "
                         '.jsonl or .txt, or pass --input_format csv|jsonl|txt.')
    return INPUT_FORMATS[extension]


def check_paths(input_path: str, output_path: str) -> None:
    """The input is a readable file (or -); the output is not a folder, not the input, and its folder exists."""
    if input_path != '-':
        if os.path.isdir(input_path):
            raise UsageError(f"--input '{input_path}' is a folder; pass the CSV, JSONL or text file itself.")
        if not os.path.isfile(input_path):
            raise UsageError(f"--input '{input_path}' does not exist. Pass the file of comments to score (or - for "
                             'standard input).')
    if output_path == '-':
        return
    if os.path.isdir(output_path):
        raise UsageError(f"--output '{output_path}' is a folder; pass a file path inside it, e.g. "
                         f"{os.path.join(output_path, 'predictions.csv')}.")
    if input_path != '-' and os.path.realpath(output_path) == os.path.realpath(input_path):
        raise UsageError(f"--output '{output_path}' is the input file; scoring would overwrite the comments it reads. "
                         'Write the predictions to another file.')
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise UsageError(f"--output '{output_path}': its folder {folder} does not exist. Create it first, or write "
                         'somewhere else.')


# ---------------------------------------------------------------------------------------------
# Reading in chunks
# ---------------------------------------------------------------------------------------------

def open_text(path: str):
    """The input as strict UTF-8 text (a byte that is not UTF-8 raises UnicodeDecodeError)."""
    if path == '-':
        return io.TextIOWrapper(sys.stdin.buffer, encoding='utf-8', errors='strict', newline='')
    return open(path, encoding='utf-8', errors='strict', newline='')


def csv_chunks(path: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """Every cell as text, exactly as written (no NA guessing: an empty cell is an empty string)."""
    source = sys.stdin.buffer if path == '-' else path
    try:
        reader = pd.read_csv(source, dtype=str, keep_default_na=False, na_filter=False, chunksize=chunk_size,
                             encoding='utf-8')
    except pd.errors.EmptyDataError:
        return
    with reader:
        yield from reader


def jsonl_chunks(path: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """One JSON object a line; blank lines are skipped."""
    with open_text(path) as fh:
        records = []
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--input '{path}': line {number} is not valid JSON ({exc.msg}). A JSONL file holds one "
                                 'JSON object per line.')
            if not isinstance(record, dict):
                raise UsageError(f"--input '{path}': line {number} is a JSON {type(record).__name__}, not an object. "
                                 'Each line must be an object such as {"comment": "..."}.')
            records.append(record)
            if len(records) == chunk_size:
                yield pd.DataFrame.from_records(records)
                records = []
        if records:
            yield pd.DataFrame.from_records(records)


def text_chunks(path: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """One text a line; an empty line is an empty text (its row is kept)."""
    with open_text(path) as fh:
        lines = []
        for line in fh:
            lines.append(line.rstrip('\r\n'))
            if len(lines) == chunk_size:
                yield pd.DataFrame({TEXT_FILE_COLUMN: lines})
                lines = []
        if lines:
            yield pd.DataFrame({TEXT_FILE_COLUMN: lines})


CHUNK_READERS: Dict[str, Callable[[str, int], Iterator[pd.DataFrame]]] = {
    'csv': csv_chunks, 'jsonl': jsonl_chunks, 'txt': text_chunks}


def readable_chunks(path: str, fmt: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """The input's chunks; a byte that is not UTF-8, wherever it is, is a usage error naming the file."""
    try:
        yield from CHUNK_READERS[fmt](path, chunk_size)
    except UnicodeDecodeError as exc:
        raise UsageError(f"--input '{path}' is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at position "
                         f'{exc.start} of a block cannot be decoded). Save it as UTF-8 (e.g. iconv -f CP1252 -t UTF-8) '
                         'and score again.')
    except pd.errors.ParserError as exc:
        raise UsageError(f"--input '{path}' could not be read as CSV ({str(exc).strip()}). Check that it is a "
                         'comma-separated file with a header row, or pass --input_format.')


def first_chunk(chunks: Iterator[pd.DataFrame], path: str, text_column: str) -> pd.DataFrame:
    """The first non-empty chunk, checked: the file has rows and the text column."""
    for chunk in chunks:
        if len(chunk):
            if text_column not in chunk.columns:
                raise UsageError(f"--text_column '{text_column}' is not in '{path}'. Its columns are: "
                                 f"{', '.join(map(str, chunk.columns))}. Pass the one that holds the comments.")
            return chunk
    raise UsageError(f"--input '{path}' is empty (no rows to score). Pass a file with a header row and at least one row "
                     '(CSV), one JSON object a line (JSONL) or one text a line (.txt).')


# ---------------------------------------------------------------------------------------------
# Scoring a chunk
# ---------------------------------------------------------------------------------------------

def is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def chunk_probabilities(classifier, texts: List, batch_size: int, progress=None) -> np.ndarray:
    """[rows, labels] probabilities, NaN where a text is empty or missing; batches of similar length (the
    chunk is tokenized once, sorted longest first, padded per batch)."""
    probs = np.full((len(texts), len(classifier.label_names)), np.nan, dtype=np.float32)
    present = np.asarray([i for i, t in enumerate(texts) if is_text(t)], dtype=np.int64)
    if not len(present):
        return probs
    tokenizer = classifier.tokenizer
    encoded = tokenizer([texts[i] for i in present], truncation=True, max_length=classifier.max_length)
    names = [k for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in encoded]
    order = length_sorted_order([len(row) for row in encoded['input_ids']])
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = pad_token_rows({k: [encoded[k][i] for i in rows] for k in names}, tokenizer.pad_token_id or 0,
                               getattr(tokenizer, 'padding_side', 'right'))
        probs[present[rows]] = classifier.probabilities(batch)
        if progress is not None:
            progress.update(len(rows))
    return probs


def scored_frame(chunk: pd.DataFrame, probs: np.ndarray, thresholds: Dict[str, float]) -> pd.DataFrame:
    """The chunk's columns, one probability column per label, and the predicted labels ('' when empty)."""
    names = list(thresholds)
    out = chunk.copy()
    for j, name in enumerate(names):
        out[PROBABILITY_PREFIX + name] = probs[:, j]
    limits = np.asarray([thresholds[n] for n in names], dtype=np.float32)
    flagged = probs >= limits
    out[PREDICTED_COLUMN] = [','.join(n for n, f in zip(names, row) if f) for row in flagged]
    return out


def output_columns(label_names: List[str]) -> List[str]:
    return [PROBABILITY_PREFIX + n for n in label_names] + [PREDICTED_COLUMN]


def write_frame(fh, frame: pd.DataFrame, as_jsonl: bool, header: bool) -> None:
    if as_jsonl:
        text = frame.to_json(orient='records', lines=True, force_ascii=False)
        fh.write(text if text.endswith('\n') else text + '\n')
    else:
        frame.to_csv(fh, header=header, index=False, na_rep='', lineterminator='\n')


# ---------------------------------------------------------------------------------------------
# The score command
# ---------------------------------------------------------------------------------------------

def score_command(args: argparse.Namespace, load_model: Callable[[], object]) -> int:
    """Check the paths, read the first chunk (format, rows, text column), load the model, then score chunk
    after chunk into a temporary file renamed to --output at the end (removed if anything fails)."""
    check_paths(args.input, args.output)
    fmt = input_format(args.input, args.input_format)
    column = TEXT_FILE_COLUMN if fmt == 'txt' else args.text_column
    chunks = readable_chunks(args.input, fmt, args.chunk_size)
    head = first_chunk(chunks, args.input, column)
    classifier = load_model()
    if args.threads:
        torch.set_num_threads(args.threads)
        classifier.set_threads(args.threads)
    clash = [c for c in output_columns(classifier.label_names) if c in head.columns]
    if clash:
        raise UsageError(f"--input '{args.input}' already has the column(s) {', '.join(clash)} that scoring writes. "
                         'Rename or drop them (e.g. score the output of an earlier run without its prediction columns).')
    if args.output == '-':
        stats = score_chunks(classifier, head, chunks, column, sys.stdout, args)
    else:
        stats = score_into_file(classifier, head, chunks, column, args)
    print(f"[score] {stats['rows']} rows ({stats['empty']} empty or missing texts) in {stats['seconds']:.1f} s: "
          f"{stats['texts_per_second']:.0f} texts/s -> {args.output}", file=sys.stderr)
    return 0


def score_into_file(classifier, head, chunks, column: str, args) -> Dict:
    tmp = temporary_path(args.output)
    try:
        with open(tmp, 'w', encoding='utf-8', newline='') as fh:
            stats = score_chunks(classifier, head, chunks, column, fh, args)
        os.replace(tmp, args.output)
    finally:
        if os.path.lexists(tmp):
            remove_entry(tmp)
    return stats


def score_chunks(classifier, head: pd.DataFrame, chunks, column: str, fh, args) -> Dict:
    """Score the first chunk and every following one, writing each as soon as it is scored."""
    thresholds = label_thresholds(classifier)
    as_jsonl = args.output.lower().endswith(('.jsonl', '.ndjson'))
    rows = empty = 0
    start = time.perf_counter()
    with tqdm(unit='texts', desc='scoring', file=sys.stderr, disable=not args.progress, dynamic_ncols=True) as bar:
        for chunk in _chain(head, chunks):
            if column not in chunk.columns:   # a JSONL chunk where no object has the key
                chunk = chunk.assign(**{column: None})
            texts = chunk[column].tolist()
            probs = chunk_probabilities(classifier, texts, args.batch_size, bar)
            write_frame(fh, scored_frame(chunk, probs, thresholds), as_jsonl, header=rows == 0)
            rows += len(chunk)
            empty += int(np.isnan(probs[:, 0]).sum()) if probs.shape[1] else 0
    seconds = time.perf_counter() - start
    return {'rows': rows, 'empty': empty, 'seconds': seconds, 'texts_per_second': rows / seconds if seconds else 0.0}


def _chain(head, chunks):
    yield head
    yield from chunks
