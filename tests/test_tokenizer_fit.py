"""research_tokenizer_fit: the fit numbers on a hand example, no warning for a tokenizer trained on the texts,
a warning for a character-level one that drops the vowel signs, and the line and record of a real run."""

import json
import os
import unicodedata

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import build_encoder, build_tokenizer, fast_args, run_cli, sample_texts
from research_tokenizer_fit import dominant_script, fit_warning, fragments, tokenizer_fit

SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def wrap(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
                                   sep_token='[SEP]', mask_token='[MASK]')


def english_like(vocab_tokens):
    """WordPiece with BERT's uncased normalizer (accent stripping removes Unicode marks), as all-MiniLM-L6-v2."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(vocab_tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return wrap(backend)


def test_the_numbers_on_a_hand_example():
    tokenizer = english_like(['শ', '##ধ', '##ই', 'ok'])
    assert tokenizer.tokenize('শুধুই ok') == ['শ', '##ধ', '##ই', 'ok']   # both vowel signs ু vanish
    fit = tokenizer_fit(tokenizer, ['শুধুই ok', 'zz'])
    # 5 pieces (শ ##ধ ##ই ok [UNK]) over 3 words; 3 cover one character; 1 unknown; of 9 characters
    # (শ ু ধ ু ই o k z z) the two ু and the unknown zz are lost.
    assert fit['tokens_per_word'] == 5 / 3
    assert fit['single_char_share'] == 3 / 5
    assert fit['unknown_share'] == 1 / 5
    assert abs(fit['chars_lost_share'] - 4 / 9) < 1e-12
    assert fragments(fit)


def test_a_tokenizer_trained_on_the_texts_fits():
    texts = sample_texts()
    backend = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=3000, special_tokens=SPECIALS))
    fit = tokenizer_fit(wrap(backend), texts)
    assert fit['single_char_share'] < 0.40 and fit['chars_lost_share'] == 0.0 and fit['unknown_share'] < 0.01
    assert not fragments(fit)


def test_a_character_level_tokenizer_without_vowel_signs_triggers_the_warning():
    texts = sample_texts()
    letters = sorted({c for t in texts for c in t.lower() if not c.isspace() and not unicodedata.category(c).startswith('M')})
    tokenizer = english_like(letters + ['##' + c for c in letters])
    fit = tokenizer_fit(tokenizer, texts)
    # Words with a letter NFD splits (য় -> য + ়) become one [UNK]: the rest are single characters.
    assert fit['single_char_share'] > 0.40 and fit['chars_lost_share'] > 0.02
    assert fragments(fit)
    script = dominant_script(texts)
    assert script == 'BENGALI'
    warning = fit_warning('teacher', '--teacher_path', 'english', fit, script)
    assert 'csebuetnlp/banglabert' in warning and 'xlm-roberta-base' in warning and '--teacher_path' in warning


def test_a_run_prints_the_fit_line_and_records_it(tmp_path, capsys):
    teacher = str(tmp_path / 'teacher')
    build_encoder(teacher, build_tokenizer(teacher, vocab_size=400), hidden=32, layers=2)
    out = tmp_path / 'out'
    assert run_cli(fast_args(out, pipeline='baseline', teacher_path=teacher, cache_dir=tmp_path / 'cache',
                             teacher_epochs=1)) == 0
    printed = capsys.readouterr().out
    assert '[tokenizer] teacher (' in printed and 'single-character pieces' in printed
    with open(os.path.join(out, 'results_final.json'), encoding='utf-8') as fh:
        fit = json.load(fh)['tokenizer_fit']['teacher']
    assert fit['model'] == teacher and 0 < fit['single_char_share'] < 1 and fit['tokens_per_word'] > 1
    # The tests' tokenizer is uncased BERT normalization: it strips the vowel signs, and the run says so.
    assert fit['chars_lost_share'] > 0.02 and '[tokenizer] warning' in printed
