"""Vocabulary trimming (research_vocab): for WordPiece, Unigram, byte-level BPE and character-level BPE tokenizers
trained in-process on the sample CSV, a trimmed tiny classifier gives exactly the original logits on texts made of
kept tokens, also after save_pretrained + Auto* reload; the unknown-token share, min_count, keep_tokens, tied output
embeddings and the errors for unsupported tokenizers."""

import copy
import os

import pytest
import torch

from conftest import sample_texts
from research_errors import UsageError
from research_vocab import _pinned_order, token_counts, trim_vocabulary, unknown_token_share

MAX_LEN = 48
TEXTS = sample_texts()
TRIM_TEXTS = TEXTS[:150]           # the corpus the vocabulary is trimmed to
EVAL_TEXTS = TRIM_TEXTS[:24]       # texts made only of kept tokens
UNSEEN = '∰∰'                      # characters that never occur in the sample CSV
KINDS = ['wordpiece-bert', 'wordpiece-distilbert', 'unigram-xlmr', 'bytelevel-bpe-roberta', 'char-bpe-electra']


def _char_bpe_tokenizer():
    """Character-level BPE with an unknown token and a '##' continuing-subword prefix, in a plain
    PreTrainedTokenizerFast (the class the project's conftest uses). Only [UNK] is in the BPE vocabulary; the
    other special tokens are added afterwards, so they live past the model vocabulary (like XLM-R's <mask>) and
    their ids, including those the post-processor stores, must be renumbered."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token='[UNK]', continuing_subword_prefix='##'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=700, special_tokens=['[UNK]'],
                                                       continuing_subword_prefix='##'))
    tok.add_special_tokens(['[PAD]', '[CLS]', '[SEP]', '[MASK]'])
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B [SEP]',
        special_tokens=[('[CLS]', tok.token_to_id('[CLS]')), ('[SEP]', tok.token_to_id('[SEP]'))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
                                   sep_token='[SEP]', mask_token='[MASK]')


def _bert_base_layout(tokenizer):
    """The same WordPiece vocabulary laid out like bert-base-uncased: [PAD]=0, then ordinary tokens, then
    [UNK] [CLS] [SEP] [MASK] at 100..103. Trimming drops some of the ordinary tokens below 100, so keeping the
    special tokens at their ids reorders the embedding rows."""
    from transformers import BertTokenizer
    vocab = tokenizer.get_vocab()
    specials = ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    ordinary = [t for t in sorted(vocab, key=vocab.get) if t not in specials and t != '[PAD]']
    order = ['[PAD]'] + ordinary[:99] + specials + ordinary[99:]
    return BertTokenizer(vocab={t: i for i, t in enumerate(order)})


def _build(kind):
    """(tokenizer, tiny randomly initialised 5-label multi-label classifier) for one tokenizer/model kind."""
    import transformers as tf
    if kind == 'wordpiece-bert':
        tokenizer = tf.BertTokenizer().train_new_from_iterator(TEXTS, 800)
    elif kind == 'wordpiece-distilbert':
        tokenizer = _bert_base_layout(tf.BertTokenizer().train_new_from_iterator(TEXTS, 800))
    elif kind.startswith('unigram'):
        tokenizer = tf.XLMRobertaTokenizer().train_new_from_iterator(TEXTS, 800)
    elif kind.startswith('bytelevel'):
        tokenizer = tf.RobertaTokenizer().train_new_from_iterator(TEXTS, 800)
    else:
        tokenizer = _char_bpe_tokenizer()
    common = dict(vocab_size=len(tokenizer), num_labels=5, problem_type='multi_label_classification',
                  pad_token_id=tokenizer.pad_token_id)
    bert_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    if kind == 'wordpiece-bert':
        model = tf.BertForSequenceClassification(tf.BertConfig(max_position_embeddings=64, **bert_like, **common))
    elif kind == 'wordpiece-distilbert':
        config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **common)
        model = tf.DistilBertForSequenceClassification(config)
    elif kind == 'unigram-xlmr':
        config = tf.XLMRobertaConfig(max_position_embeddings=MAX_LEN + tokenizer.pad_token_id + 2,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **bert_like, **common)
        model = tf.XLMRobertaForSequenceClassification(config)
    elif kind == 'bytelevel-bpe-roberta':
        config = tf.RobertaConfig(max_position_embeddings=MAX_LEN + tokenizer.pad_token_id + 2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **bert_like, **common)
        model = tf.RobertaForSequenceClassification(config)
    else:
        model = tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, max_position_embeddings=64,
                                                                     **bert_like, **common))
    return tokenizer, model.eval()


@pytest.fixture(scope='module')
def built():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _build(kind)
        return cache[kind]
    return get


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors='pt')
    with torch.no_grad():
        return model(**batch).logits


def _tokens(tokenizer, texts):
    ids = tokenizer(texts, truncation=True, max_length=MAX_LEN)['input_ids']
    return [tokenizer.convert_ids_to_tokens(seq) for seq in ids]


def _single_token_words(tokenizer, n):
    """Words of the trim corpus that the tokenizer keeps as one token (no subword prefix/marker needed)."""
    words = []
    for word in dict.fromkeys(' '.join(TRIM_TEXTS).split()):
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1 and pieces[0] != tokenizer.unk_token and len(word) > 1:
            words.append(word)
        if len(words) == n:
            return words
    raise AssertionError('no single-token words found')


@pytest.mark.parametrize('kind', KINDS)
def test_trimmed_model_gives_identical_logits_and_reloads(kind, built, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer, model = built(kind)
    before = _logits(model, tokenizer, EVAL_TEXTS)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()

    trimmed, new_tokenizer, report = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN)

    # The vocabulary really shrank, in the tokenizer, the embedding matrix and the config.
    rows = trimmed.get_input_embeddings().weight.shape[0]
    assert rows == len(new_tokenizer) == trimmed.config.vocab_size == report['vocab_size_after']
    assert rows < len(tokenizer) == report['vocab_size_before']
    assert type(new_tokenizer) is type(tokenizer)
    # Same tokens, renumbered ids; every kept embedding row moved with its token.
    assert _tokens(new_tokenizer, EVAL_TEXTS) == _tokens(tokenizer, EVAL_TEXTS)
    new_weight = trimmed.get_input_embeddings().weight.detach()
    for token, new_id in new_tokenizer.get_vocab().items():
        assert torch.equal(new_weight[new_id], old_embeddings[tokenizer.convert_tokens_to_ids(token)]), token
    assert trimmed.config.pad_token_id == new_tokenizer.pad_token_id
    old_special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    new_special = dict(zip(new_tokenizer.all_special_tokens, new_tokenizer.all_special_ids))
    if kind == 'char-bpe-electra':  # added past the model vocabulary: renumbered (post-processor included)
        assert all(new_special[t] < old_special[t] for t in ('[CLS]', '[SEP]', '[PAD]'))
    else:  # special tokens keep their ids (bert-base layout: [UNK]..[MASK] stay at 100..103)
        assert new_special == old_special
    assert torch.equal(_logits(trimmed, new_tokenizer, EVAL_TEXTS), before)

    # The saved folder is a plain HF checkpoint: Auto* classes load it and predict the same.
    full_dir, trim_dir = tmp_path / 'full', tmp_path / 'trimmed'
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    trimmed.save_pretrained(trim_dir)
    new_tokenizer.save_pretrained(trim_dir)
    assert os.path.getsize(trim_dir / 'model.safetensors') < os.path.getsize(full_dir / 'model.safetensors')
    assert os.path.getsize(trim_dir / 'tokenizer.json') < os.path.getsize(full_dir / 'tokenizer.json')
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(trim_dir))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(trim_dir)).eval()
    assert type(reloaded_tokenizer) is type(tokenizer)
    probe = EVAL_TEXTS + [f'{EVAL_TEXTS[0]} {UNSEEN}']  # the unseen text exercises the unk id after reload
    assert _tokens(new_tokenizer, probe) == _tokens(tokenizer, probe)
    assert reloaded_tokenizer(probe)['input_ids'] == new_tokenizer(probe)['input_ids']
    assert torch.equal(_logits(reloaded, reloaded_tokenizer, EVAL_TEXTS), before)


@pytest.mark.parametrize('kind', ['wordpiece-bert', 'unigram-xlmr', 'bytelevel-bpe-roberta', 'char-bpe-electra'])
def test_unknown_token_share(kind, built):
    tokenizer, model = built(kind)
    _, trimmed, report = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS[:40], MAX_LEN)
    w1, w2 = _single_token_words(trimmed, 2)
    # A word the original vocabulary holds as one token but that the trimmed one dropped (not in TRIM_TEXTS[:40]).
    kept = set(trimmed.get_vocab())
    dropped = next(w for w in ' '.join(TEXTS[40:]).split() if len(tokenizer.tokenize(w)) == 1
                   and tokenizer.tokenize(w)[0] not in kept and len(w) > 1)
    unseen_text, dropped_text = f'{w1} {w2} {UNSEEN}', f'{w1} {w2} {dropped}'
    assert unknown_token_share(tokenizer, [dropped_text], MAX_LEN) == 0.0
    if kind == 'bytelevel-bpe-roberta':
        # Byte-level BPE never produces the unknown token: unseen characters and dropped words fall back to bytes.
        assert report['unknown_tokens_possible'] is False
        for text in (unseen_text, dropped_text):
            assert unknown_token_share(trimmed, [text], MAX_LEN) == 0.0
            assert trimmed.decode(trimmed(text)['input_ids'], skip_special_tokens=True) == text
        return
    assert report['unknown_tokens_possible'] is True
    # WordPiece maps a whole unmatched word to one unknown token, Unigram fuses unknown characters, character-level
    # BPE (fuse_unk off) gives one per unknown character but splits a dropped word into kept smaller pieces.
    expected_unknowns = {'unseen': 2 if kind == 'char-bpe-electra' else 1,
                         'dropped': 0 if kind == 'char-bpe-electra' else 1}
    for name, text in (('unseen', unseen_text), ('dropped', dropped_text)):
        # Ids, not tokenize(): Unigram reports an unknown piece with its own text but the unk id.
        ids = trimmed(text, add_special_tokens=False)['input_ids']
        assert ids.count(trimmed.unk_token_id) == expected_unknowns[name], trimmed.convert_ids_to_tokens(ids)
        assert unknown_token_share(trimmed, [text], MAX_LEN) == pytest.approx(expected_unknowns[name] / len(ids))
    if kind == 'wordpiece-bert':
        # WordPiece maps a whole unmatched word to one [UNK]: exactly one of three words.
        assert unknown_token_share(trimmed, [unseen_text], MAX_LEN) == pytest.approx(1 / 3)
        assert unknown_token_share(trimmed, [dropped_text], MAX_LEN) == pytest.approx(1 / 3)
    # On the trim corpus itself nothing new becomes unknown.
    assert unknown_token_share(trimmed, TRIM_TEXTS[:40], MAX_LEN) == unknown_token_share(tokenizer, TRIM_TEXTS[:40],
                                                                                         MAX_LEN)


@pytest.mark.parametrize('kind', ['wordpiece-bert', 'unigram-xlmr', 'bytelevel-bpe-roberta', 'char-bpe-electra'])
def test_min_count_and_keep_tokens(kind, built):
    tokenizer, model = built(kind)
    _, trimmed, report = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN)
    _, trimmed3, report3 = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN, min_count=3)
    counts = token_counts(tokenizer, TRIM_TEXTS, MAX_LEN)
    assert report['tokens_kept_from_texts'] == len(counts)
    assert report3['tokens_kept_from_texts'] == sum(c >= 3 for c in counts.values()) < len(counts)
    assert report3['vocab_size_after'] < report['vocab_size_after']
    assert report3['trim_vocab_min_count'] == 3
    assert _tokens(trimmed3, TRIM_TEXTS) != _tokens(tokenizer, TRIM_TEXTS)  # rare tokens are gone

    # A multi-character token outside the trim corpus that the original tokenizer produces on its own text.
    kept = set(trimmed.get_vocab())
    specials = set(tokenizer.all_special_tokens)
    forced = next(t for t in sorted(tokenizer.get_vocab(), key=len, reverse=True)
                  if t not in kept and t not in specials
                  and tokenizer.tokenize(tokenizer.convert_tokens_to_string([t]).strip()) == [t])
    text = tokenizer.convert_tokens_to_string([forced]).strip()
    assert trimmed.tokenize(text) != [forced]
    forced_model, with_forced, report_forced = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN,
                                                               keep_tokens=[forced])
    assert report_forced['tokens_kept_forced'] == 1
    # For BPE this only holds if the merges that build the token (and their parts) were kept too.
    assert with_forced.tokenize(text) == [forced]
    assert torch.equal(forced_model.get_input_embeddings().weight[with_forced.convert_tokens_to_ids(forced)],
                       model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(forced)])
    with pytest.raises(UsageError, match='not in the vocabulary'):
        trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN, keep_tokens=['no-such-token-xyz'])


def test_tied_output_embeddings_are_trimmed_with_the_input_ones(built):
    from transformers import BertConfig, BertForMaskedLM
    tokenizer, _ = built('wordpiece-bert')
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                       pad_token_id=tokenizer.pad_token_id)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a non-zero bias, so that mis-ordered bias entries show up
    before = _logits(model, tokenizer, EVAL_TEXTS)
    trimmed, new_tokenizer, _ = trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN)
    assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight
    old_ids = tokenizer.convert_tokens_to_ids(new_tokenizer.convert_ids_to_tokens(list(range(len(new_tokenizer)))))
    assert torch.equal(_logits(trimmed, new_tokenizer, EVAL_TEXTS), before[..., old_ids])


def test_unsupported_tokenizers_raise_usage_error(built, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerLegacy, PreTrainedTokenizerFast
    tokenizer, model = built('wordpiece-bert')
    vocab_file = tmp_path / 'vocab.txt'
    vocab = tokenizer.get_vocab()
    vocab_file.write_text('\n'.join(sorted(vocab, key=vocab.get)) + '\n', encoding='utf-8')
    slow = BertTokenizerLegacy(str(vocab_file))
    with pytest.raises(UsageError, match='fast tokenizer'):
        trim_vocabulary(copy.deepcopy(model), slow, TRIM_TEXTS, MAX_LEN)
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token='[UNK]'))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    fast_word_level = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token='[UNK]', pad_token='[PAD]')
    with pytest.raises(UsageError, match='WordLevel'):
        trim_vocabulary(copy.deepcopy(model), fast_word_level, TRIM_TEXTS, MAX_LEN)
    with pytest.raises(UsageError, match='at least 1'):
        trim_vocabulary(copy.deepcopy(model), tokenizer, TRIM_TEXTS, MAX_LEN, min_count=0)


def test_special_tokens_keep_their_ids_where_they_fit():
    # Old id 3 is pinned (3 < 5 kept ids); old id 12 cannot be (no slot 12), so it follows in order.
    assert _pinned_order([0, 2, 3, 9, 12], {3, 12}) == [0, 2, 9, 3, 12]
    assert _pinned_order([0, 1, 2, 40], {0, 1, 2}) == [0, 1, 2, 40]


# ---------------------------------------------------------------------------------------------
# --trim_vocab through the pipelines
# ---------------------------------------------------------------------------------------------

def test_trim_vocab_with_structured_pruning_and_int8_end_to_end(tmp_path, teacher_checkpoint):
    """kd_prune_quant with a trimmed derived student, multi-level KD (positions still line up with the
    teacher's), structured pruning and int8: runs, reports vocab sizes and the unknown share, and reloads."""
    import json
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from conftest import fast_args, run_cli
    from research_inference import load_compressed_model
    code = run_cli(fast_args(tmp_path / 'out', pipeline='kd_prune_quant', teacher_checkpoint=teacher_checkpoint,
                             student_layers=2, kd_method='multi_level', trim_vocab=True, prune_method='structured',
                             calibration_samples=32, cache_dir=tmp_path / 'cache', save_all_stages=True))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, kd, pruned, quant = json.load(fh)['stages']
    assert kd['vocab_size_before'] == baseline['vocab_size'] > kd['vocab_size_after'] == kd['vocab_size']
    assert pruned['vocab_size'] == quant['vocab_size'] == kd['vocab_size']          # trimmed once, carried on
    assert baseline['test_unknown_token_share'] == 0.0 < quant['test_unknown_token_share'] < 0.1
    assert quant['size_mb'] < pruned['size_mb'] < baseline['size_mb']
    student_dir = kd['model_dir']
    tokenizer = AutoTokenizer.from_pretrained(student_dir)           # a plain Hugging Face folder
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == kd['vocab_size']
    predictions = load_compressed_model(quant['model_dir']).predict(['তুই একটা বেয়াদব'])
    assert len(predictions) == 1 and len(predictions[0]) == 5


def test_trim_vocab_is_part_of_the_stage_identity(tmp_path):
    from conftest import fast_args
    from research_compression_config import parse_compression_arguments, pipeline_settings, stage_identity
    plain = parse_compression_arguments(fast_args(tmp_path / 'a', pipeline='kd_prune_quant'))
    trimmed = parse_compression_arguments(fast_args(tmp_path / 'b', pipeline='kd_prune_quant', trim_vocab=True))
    for kind in ('kd', 'prune', 'quant'):
        assert stage_identity(pipeline_settings(plain, 'kd_prune_quant', 1), kind) != \
            stage_identity(pipeline_settings(trimmed, 'kd_prune_quant', 1), kind)
    assert stage_identity(pipeline_settings(plain, 'kd_prune_quant', 1), 'teacher') == \
        stage_identity(pipeline_settings(trimmed, 'kd_prune_quant', 1), 'teacher')   # the teacher is shared


def test_trim_vocab_trims_the_teacher_entering_quantization_without_kd(tmp_path, teacher_checkpoint):
    import json
    from conftest import fast_args, run_cli
    code = run_cli(fast_args(tmp_path / 'out', pipeline='quant_only', teacher_checkpoint=teacher_checkpoint,
                             trim_vocab=True, cache_dir=tmp_path / 'cache'))
    assert code == 0
    with open(tmp_path / 'out' / 'results_final.json', encoding='utf-8') as fh:
        baseline, quant = json.load(fh)['stages']
    assert quant['vocab_size_before'] == baseline['vocab_size'] > quant['vocab_size'] == quant['vocab_size_after']


def test_trimming_problems_are_refused_before_any_training(tmp_path, capsys, tiny_teacher_dir, monkeypatch):
    import transformers
    from conftest import fast_args, run_cli

    def no_training(*args, **kwargs):
        raise AssertionError('a model was trained before the trimming settings were checked')
    monkeypatch.setattr(transformers.Trainer, 'train', no_training)
    cases = [({'trim_vocab_keep': 'not-a-token-xyz'}, 'not in the vocabulary'),
             ({'trim_vocab_min_count': 2, 'kd_method': 'multi_level'}, '--trim_vocab_min_count 2'),
             ({'pipeline': 'baseline'}, 'it would do nothing')]
    for i, (extra, expected) in enumerate(cases):
        settings = {'pipeline': 'kd_prune_quant', **extra}
        code = run_cli(fast_args(tmp_path / f'out{i}', teacher_path=tiny_teacher_dir, student_layers=2, trim_vocab=True,
                                 cache_dir=tmp_path / 'cache', **settings))
        assert code == 2 and expected in capsys.readouterr().err
        assert not (tmp_path / f'out{i}').exists()
