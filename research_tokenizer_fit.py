"""Tokenizer fit: owns measuring how well a model's tokenizer reads the run's language, and warning when it
fragments it.

An English tokenizer reads Bangla as single characters and its normalizer (BERT's accent stripping, which
removes Unicode marks) deletes the vowel signs: all-MiniLM-L6-v2 turns শুধুই into শ ##ধ ##ই. The model then
never sees the text it is scored on, and nothing in the metrics says why. Counted on (a sample of) the
training texts, per tokenizer the run uses:
  tokens_per_word       non-special pieces / whitespace-separated words;
  single_char_share     pieces of one character once their ##/▁/Ġ marker is removed, of all pieces (a
                        byte-level piece of a multi-byte character counts as one character);
  unknown_share         pieces that are the unknown token, of all pieces;
  chars_lost_share      characters of the (NFC, case-folded, whitespace-free) text missing from the decoded
                        pieces (multiset difference; unknown pieces decode to nothing), of all characters.
Thresholds (FRAGMENTS_*): a tokenizer trained on the language keeps single characters to punctuation, digits
and emoji (a WordPiece trained on the texts: about 10-25 %, see docs/measurement.md) and loses no characters;
past 40 % single-character pieces or 2 % characters lost, the words are not what the model reads.
"""

import collections
import unicodedata
from typing import Dict, Optional, Sequence

import numpy as np

from research_models import load_tokenizer

FRAGMENTS_SINGLE_CHAR_SHARE = 0.40
FRAGMENTS_CHARS_LOST_SHARE = 0.02
FRAGMENTS_UNKNOWN_SHARE = 0.05
SAMPLE_TEXTS = 3000
# What to use instead, by the script most letters of the texts are written in.
SUGGESTIONS = {'BENGALI': 'a tokenizer trained on Bangla (e.g. csebuetnlp/banglabert) or a multilingual one '
                          '(xlm-roberta-base, bert-base-multilingual-cased)'}
DEFAULT_SUGGESTION = 'a tokenizer trained on the language, or a multilingual one (xlm-roberta-base, ' \
                     'bert-base-multilingual-cased)'


def _characters(text: str) -> collections.Counter:
    return collections.Counter(c for c in unicodedata.normalize('NFC', text).casefold() if not c.isspace())


def _surface(piece: str) -> str:
    """A piece without its word-continuation or word-start marker (WordPiece ##, SentencePiece ▁, byte-level Ġ)."""
    return piece[2:] if piece.startswith('##') and len(piece) > 2 else piece.lstrip('▁Ġ') or piece


def tokenizer_fit(tokenizer, texts: Sequence[str]) -> Dict:
    """The four fit numbers (module docstring) of a fast tokenizer on `texts`, whole texts, no special tokens."""
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    pieces = single = unknown = words = chars = lost = 0
    for text in texts:
        ids = [i for i in tokenizer(text, add_special_tokens=False)['input_ids'] if i not in special]
        pieces += len(ids)
        unknown += sum(1 for i in ids if unk is not None and i == unk)
        single += sum(1 for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))
                      if i != unk and len(_surface(piece)) == 1)
        words += len(text.split())
        wanted = _characters(text)
        decoded = _characters(tokenizer.decode([i for i in ids if i != unk], clean_up_tokenization_spaces=False))
        chars += sum(wanted.values())
        lost += sum((wanted - decoded).values())
    return {'texts': len(texts), 'tokens_per_word': pieces / words if words else 0.0,
            'single_char_share': single / pieces if pieces else 0.0,
            'unknown_share': unknown / pieces if pieces else 0.0,
            'chars_lost_share': lost / chars if chars else 0.0}


def dominant_script(texts: Sequence[str]) -> Optional[str]:
    """First word of the Unicode name of most letters (LATIN, BENGALI, ...), None without letters."""
    counts = collections.Counter(unicodedata.name(c, '').split(' ')[0] for t in texts for c in t if c.isalpha())
    return counts.most_common(1)[0][0] if counts else None


def fragments(fit: Dict) -> bool:
    return (fit['single_char_share'] > FRAGMENTS_SINGLE_CHAR_SHARE or fit['chars_lost_share'] > FRAGMENTS_CHARS_LOST_SHARE
            or fit['unknown_share'] > FRAGMENTS_UNKNOWN_SHARE)


def fit_line(role: str, source: str, fit: Dict) -> str:
    return (f"[tokenizer] {role} ({source}): {fit['tokens_per_word']:.2f} tokens/word, {fit['single_char_share']:.1%} "
            f"single-character pieces, {fit['unknown_share']:.2%} [UNK], {fit['chars_lost_share']:.2%} characters lost "
            f"({fit['texts']:,} training texts)")


def fit_warning(role: str, flag: str, source: str, fit: Dict, script: Optional[str]) -> str:
    return (f"[tokenizer] warning: the {role}'s tokenizer ({source}) fragments this language "
            f"({fit['single_char_share']:.0%} single-character pieces, limit {FRAGMENTS_SINGLE_CHAR_SHARE:.0%}; "
            f"{fit['chars_lost_share']:.1%} of characters lost, limit {FRAGMENTS_CHARS_LOST_SHARE:.0%}; "
            f"{fit['unknown_share']:.1%} [UNK], limit {FRAGMENTS_UNKNOWN_SHARE:.0%}): the model will not read the "
            f"words it is scored on. Use {SUGGESTIONS.get(script, DEFAULT_SUGGESTION)} via {flag}.")


def tokenizer_roles(settings_by_pipeline: Sequence) -> Dict[str, tuple]:
    """{role: (flag, model path)} of the tokenizers a run reads with: the teacher's, and a student's own
    (--student_path, when a pipeline distils into one rather than deriving it with --student_layers)."""
    roles = {}
    for settings, chain in settings_by_pipeline:
        roles.setdefault('teacher', ('--teacher_checkpoint' if settings.teacher_checkpoint else '--teacher_path',
                                     settings.teacher_checkpoint or settings.teacher_path))
        if 'kd' in chain and not settings.student_layers:
            roles.setdefault('student', ('--student_path', settings.student_path))
    return roles


def report_tokenizer_fit(roles: Dict[str, tuple], data, seed: int) -> Dict[str, Dict]:
    """Print a fit line per role (and a warning for a tokenizer that fragments the language), measured on up to
    SAMPLE_TEXTS training texts (seeded sample); returns {role: fit, with its model path} for the results."""
    train = np.asarray(data.train_idx)
    picked = np.random.default_rng(seed).choice(train, size=min(SAMPLE_TEXTS, len(train)), replace=False)
    texts = [data.texts[i] for i in sorted(picked)]
    script, found = dominant_script(texts), {}
    for role, (flag, path) in roles.items():
        tokenizer = load_tokenizer(path)
        fit = tokenizer_fit(tokenizer, texts)
        print(fit_line(role, path, fit))
        if fragments(fit):
            print(fit_warning(role, flag, path, fit, script))
        found[role] = {**fit, 'model': path, 'fragments': fragments(fit), 'script': script}
    return found
