"""Vocabulary trimming: owns shrinking a model's token embeddings and its fast tokenizer to the tokens a corpus uses.

Small and multilingual encoders spend most of their parameters on embedding rows that a given corpus never
touches (all-MiniLM-L6-v2's tokenizer produces 217 of its 30,522 ids on our data). `trim_vocabulary` keeps only
the rows for tokens seen in the texts (plus special tokens, user-forced tokens and whatever the tokenization
algorithm needs to stay correct), renumbers the ids, and rebuilds the fast tokenizer so that the saved folder is
a plain Hugging Face checkpoint giving exactly the same logits on any text made only of kept tokens.

Supported tokenizer models (Rust `tokenizers` backend only): WordPiece (BERT, ELECTRA, DistilBERT), Unigram
(SentencePiece, XLM-R) and BPE (byte-level as in RoBERTa/GPT-2, or character-level with an unknown token).
The cost is on text outside the trim corpus: WordPiece turns a word with a dropped piece into one unknown token;
Unigram and character-level BPE re-segment it into kept pieces and only what no kept piece covers becomes
unknown; byte-level BPE keeps the byte alphabet, so nothing is ever unknown.
"""

import collections
import json

import torch
from tokenizers import Tokenizer, pre_tokenizers

from research_errors import UsageError

SUPPORTED_MODELS = ('WordPiece', 'Unigram', 'BPE')
# Config fields that hold token ids and must follow the renumbering.
CONFIG_TOKEN_ID_FIELDS = ('pad_token_id', 'bos_token_id', 'eos_token_id', 'sep_token_id', 'cls_token_id',
                          'decoder_start_token_id')
# init kwargs that describe where the old vocabulary came from or hold old ids: the rebuilt tokenizer gets
# its vocabulary from the new backend object instead.
_STALE_INIT_KWARGS = ('vocab', 'merges', 'vocab_file', 'merges_file', 'tokenizer_file', 'tokenizer_object',
                      'added_tokens_decoder', 'name_or_path', 'is_local', 'local_files_only', '_commit_hash',
                      'post_processor', 'tokenizer_padding', 'tokenizer_truncation')
_BATCH = 1024
_COST_NOTES = {
    'WordPiece': 'a word containing a dropped token becomes one unknown token; check unknown_token_share on '
                 'held-out text',
    'Unigram': 'text with dropped pieces is re-segmented into kept pieces; characters no kept piece covers become '
               'the unknown token; check unknown_token_share on held-out text',
    'BPE': 'words with dropped tokens are split into smaller kept tokens; characters whose own token was dropped '
           'become the unknown token (or vanish if the BPE model has none); check unknown_token_share',
    'byte-level BPE': 'the 256-symbol byte alphabet is kept, so no text is ever unknown; words with dropped tokens '
                      'are split into smaller kept tokens (longer sequences)',
}


def token_counts(tokenizer, texts, max_length):
    """Counter of the token ids the tokenizer produces on `texts` (special tokens included, truncated at
    `max_length`, i.e. exactly the ids the model would see; `None`: whole texts)."""
    _require_fast(tokenizer)
    texts = [str(t) for t in texts]
    counts = collections.Counter()
    for start in range(0, len(texts), _BATCH):
        encoded = tokenizer(texts[start:start + _BATCH], add_special_tokens=True, truncation=max_length is not None,
                            max_length=max_length)
        for ids in encoded['input_ids']:
            counts.update(ids)
    return counts


def unknown_token_share(tokenizer, texts, max_length):
    """Fraction of the non-special tokens produced on `texts` that are the unknown token (0.0 when the
    tokenizer has no unknown token or produces no tokens)."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return 0.0
    counts = token_counts(tokenizer, texts, max_length)
    # The unk token is itself a special token: exclude the others ([CLS], padding...) but not it.
    special = set(tokenizer.all_special_ids) - {unk_id}
    total = sum(c for i, c in counts.items() if i not in special)
    return counts[unk_id] / total if total else 0.0


def trim_vocabulary(model, tokenizer, texts, max_length, min_count=1, keep_tokens=()):
    """Keep only the tokens used >= `min_count` times in `texts` (plus special tokens, `keep_tokens` and what
    the tokenizer algorithm needs); shrink the model's embeddings and rebuild the tokenizer.

    Returns (model, tokenizer, report). The model is modified in place; the tokenizer is a new object of the
    same class. Ids are renumbered in their old order, except that special tokens keep their old ids where
    the trimmed vocabulary is long enough (RoBERTa derives position ids from the pad id, and XLM-R's
    tokenizer class hard-codes the unk id 3 when it reloads).
    """
    check_trimmable(tokenizer, keep_tokens)
    if int(min_count) < 1:
        raise UsageError(f'--trim_vocab_min_count must be at least 1 (got {min_count}).')
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec['model'].get('type')
    embeddings = model.get_input_embeddings()
    rows_before = embeddings.weight.shape[0]
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= rows_before:
        raise UsageError(
            f'The tokenizer produces ids up to {max(vocab.values())} but the model has only {rows_before} '
            f'embedding rows, so they do not belong together; load the tokenizer saved with this model.')

    counts = token_counts(tokenizer, texts, max_length)
    from_texts = {i for i, c in counts.items() if c >= min_count}
    forced = _ids_of_tokens(vocab, keep_tokens)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    referenced = _referenced_ids(spec, model.config, embeddings, rows_before)
    model_ids = _model_vocab_ids(spec)
    kept = from_texts | forced | special | referenced
    needed = _algorithm_needs(spec, kept) - kept
    kept |= needed

    # Model-vocabulary ids first (tokenizers wants them contiguous from 0), then tokens only the added-token
    # layer knows about.
    order = _pinned_order(sorted(kept & model_ids), special & model_ids) + sorted(kept - model_ids)
    old_to_new = {old: new for new, old in enumerate(order)}
    backend = Tokenizer.from_str(json.dumps(_remap_spec(spec, old_to_new)))
    new_tokenizer = _wrap_like(tokenizer, backend)
    if len(new_tokenizer) != len(order):
        raise RuntimeError(f'rebuilt tokenizer has {len(new_tokenizer)} tokens, expected {len(order)}')

    _shrink_embeddings(model, order, old_to_new)
    _remap_config(model.config, old_to_new, len(order))

    byte_level = kind == 'BPE' and _is_byte_level(spec)
    dim = embeddings.weight.shape[1]
    report = {
        'vocab_size_before': rows_before,
        'vocab_size_after': len(order),
        'trim_vocab_min_count': int(min_count),
        'tokens_kept_from_texts': len(from_texts),
        'tokens_seen_in_texts': len(counts),
        'tokens_kept_special': len(special),
        'tokens_kept_forced': len(forced),
        'tokens_kept_for_tokenizer': len(needed),
        'tokenizer_model': kind,
        'byte_level': byte_level,
        'embedding_parameters_before': rows_before * dim,
        'embedding_parameters_after': len(order) * dim,
        'unknown_tokens_possible': not byte_level,
        'note': _COST_NOTES['byte-level BPE' if byte_level else kind],
    }
    return model, new_tokenizer, report


def check_trimmable(tokenizer, keep_tokens=()) -> None:
    """Refuse, before any work, a tokenizer this module cannot rebuild (slow, or neither WordPiece, Unigram
    nor BPE) and `keep_tokens` that are not in its vocabulary."""
    _require_fast(tokenizer)
    kind = json.loads(tokenizer.backend_tokenizer.to_str())['model'].get('type')
    if kind not in SUPPORTED_MODELS:
        raise UsageError(
            f'Vocabulary trimming supports WordPiece, Unigram (SentencePiece) and BPE tokenizers, but this '
            f'tokenizer ({type(tokenizer).__name__}) uses a {kind} model, for which this tool does not know which '
            f'tokens the algorithm needs to keep its output unchanged. Use a model whose tokenizer is one of '
            f'these kinds, or drop --trim_vocab.')
    _ids_of_tokens(tokenizer.get_vocab(), list(keep_tokens))


def _require_fast(tokenizer):
    """Raise UsageError unless the tokenizer has a Rust `tokenizers` backend that can be rebuilt from JSON."""
    if getattr(tokenizer, 'is_fast', False) and hasattr(tokenizer, 'backend_tokenizer'):
        return
    raise UsageError(
        f'Vocabulary trimming needs a fast tokenizer (one backed by the Rust `tokenizers` library, saved as '
        f'tokenizer.json), because it rebuilds the tokenizer from that JSON with the dropped tokens removed; '
        f'{type(tokenizer).__name__} is a slow (Python) tokenizer. Load the fast tokenizer instead '
        f'(AutoTokenizer.from_pretrained on a checkpoint that ships tokenizer.json), or drop --trim_vocab.')


def _ids_of_tokens(vocab, tokens):
    """Ids of user-named tokens; unknown names are an error rather than silently ignored."""
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise UsageError(f'--trim_vocab_keep names tokens that are not in the vocabulary: {missing[:10]}. '
                         f'Give token strings exactly as the tokenizer spells them (see tokenizer.tokenize()).')
    return {vocab[t] for t in tokens}


def _model_vocab_ids(spec):
    """Ids held by the tokenizer model itself (as opposed to tokens known only to the added-token layer)."""
    vocab = spec['model']['vocab']
    return set(range(len(vocab))) if isinstance(vocab, list) else set(vocab.values())


def _referenced_ids(spec, config, embeddings, rows):
    """Ids that the post-processor, the padding setting, the model config or the embedding's padding_idx
    point at: they must survive so that every reference can be renumbered."""
    ids = set(_post_processor_ids(spec.get('post_processor')))
    if spec.get('padding'):
        ids.add(spec['padding']['pad_id'])
    for field in CONFIG_TOKEN_ID_FIELDS:
        value = getattr(config, field, None)
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(i, int) and 0 <= i < rows:
                ids.add(i)
    if getattr(embeddings, 'padding_idx', None) is not None:
        ids.add(embeddings.padding_idx)
    return ids


def _post_processor_ids(processor):
    """Token ids stored inside a serialized post-processor (TemplateProcessing, Roberta/BertProcessing,
    Sequence of those)."""
    if not processor:
        return []
    kind = processor.get('type')
    if kind == 'Sequence':
        return [i for p in processor['processors'] for i in _post_processor_ids(p)]
    if kind == 'TemplateProcessing':
        return [i for entry in processor['special_tokens'].values() for i in entry['ids']]
    if kind in ('RobertaProcessing', 'BertProcessing'):
        return [processor['sep'][1], processor['cls'][1]]
    return []


def _algorithm_needs(spec, kept):
    """Extra ids the tokenization algorithm needs so that texts made of kept tokens tokenize as before."""
    model = spec['model']
    kind = model['type']
    if kind == 'WordPiece':
        # Greedy longest-match-first: a subset that still holds every output token gives the same output;
        # only the unknown token must stay, for words that no longer match.
        return {model['vocab'][model['unk_token']]}
    if kind == 'Unigram':
        return _unigram_needs(model)
    return _bpe_needs(spec, kept)


def _unigram_needs(model):
    """Unigram (Viterbi): the original best segmentation stays available and scores the same. Keep the unk
    piece, the lowest-scored piece (the Rust model penalises unknown characters relative to the minimum
    score, so dropping it would change segmentations around unknown characters) and, with byte fallback,
    the <0xNN> byte pieces."""
    pieces = model['vocab']
    needs = set()
    if model.get('unk_id') is not None:
        needs.add(model['unk_id'])
    needs.add(min(range(len(pieces)), key=lambda i: pieces[i][1]))
    if model.get('byte_fallback'):
        needs |= {i for i, (piece, _) in enumerate(pieces) if _is_byte_piece(piece)}
    return needs


def _bpe_needs(spec, kept):
    """BPE: keep the byte alphabet (byte-level), the unk token and byte pieces (byte fallback), and every
    merge ancestor of a kept token, so that the merges which built it can still fire."""
    model = spec['model']
    vocab = model['vocab']
    needs = set()
    if _is_byte_level(spec):
        needs |= {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    if model.get('unk_token') in vocab:
        needs.add(vocab[model['unk_token']])
    if model.get('byte_fallback'):
        needs |= {i for t, i in vocab.items() if _is_byte_piece(t)}
    parents = collections.defaultdict(list)
    for left, right in _merge_pairs(model):
        parents[_merge_result(model, left, right)].append((left, right))
    tokens = {i: t for t, i in vocab.items()}
    # Every token a merge produces may have been built by any merge that yields it; keep all their parts.
    stack = [tokens[i] for i in (kept | needs) if i in tokens]
    seen = set(stack)
    while stack:
        for pair in parents.get(stack.pop(), ()):
            for part in pair:
                if part not in seen:
                    seen.add(part)
                    stack.append(part)
    return needs | {vocab[t] for t in seen}


def _merge_pairs(model):
    """Merges as (left, right) pairs, from either serialization ("a b" strings or [a, b] lists)."""
    return [tuple(m.split(' ', 1)) if isinstance(m, str) else tuple(m) for m in model['merges']]


def _merge_result(model, left, right):
    """The token a merge produces; like the Rust BPE model, the right part loses the continuing-subword
    prefix."""
    prefix = model.get('continuing_subword_prefix') or ''
    return left + right[len(prefix):]


def _is_byte_level(spec):
    """Whether the pre-tokenizer maps text to the 256-symbol byte alphabet (GPT-2/RoBERTa style)."""
    def walk(node):
        if not node:
            return False
        if node.get('type') == 'ByteLevel':
            return True
        return any(walk(child) for child in node.get('pretokenizers', []))
    return walk(spec.get('pre_tokenizer'))


def _is_byte_piece(piece):
    """SentencePiece/Llama byte-fallback pieces look like <0x41>."""
    return len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>')


def _pinned_order(kept, pinned):
    """New-id -> old-id list: kept ids in their old order, except that each pinned id smaller than the
    trimmed length stays at its old position."""
    n = len(kept)
    pinned = {p for p in pinned if p < n}
    rest = iter(i for i in kept if i not in pinned)
    return [i if i in pinned else next(rest) for i in range(n)]


def _remap_spec(spec, old_to_new):
    """A copy of the serialized tokenizer with the dropped tokens removed and every stored id renumbered."""
    spec = json.loads(json.dumps(spec))
    model = spec['model']
    if model['type'] == 'Unigram':
        new_to_old = sorted((new, old) for old, new in old_to_new.items() if old < len(model['vocab']))
        model['vocab'] = [model['vocab'][old] for _, old in new_to_old]  # scores travel with the pieces
        if model.get('unk_id') is not None:
            model['unk_id'] = old_to_new[model['unk_id']]
    else:
        model['vocab'] = {t: old_to_new[i] for t, i in sorted(model['vocab'].items(), key=lambda kv: kv[1])
                          if i in old_to_new}
    if model['type'] == 'BPE':
        vocab = model['vocab']
        # Only merges whose parts and result all survive; the rest could only build dropped tokens.
        model['merges'] = [m for m, (left, right) in zip(model['merges'], _merge_pairs(model))
                           if left in vocab and right in vocab and _merge_result(model, left, right) in vocab]
    for added in spec.get('added_tokens') or []:
        added['id'] = old_to_new[added['id']]
    _remap_post_processor(spec.get('post_processor'), old_to_new)
    if spec.get('padding'):
        spec['padding']['pad_id'] = old_to_new[spec['padding']['pad_id']]
    return spec


def _remap_post_processor(processor, old_to_new):
    """Renumber the special-token ids that post-processors store (in place)."""
    if not processor:
        return
    kind = processor.get('type')
    if kind == 'Sequence':
        for p in processor['processors']:
            _remap_post_processor(p, old_to_new)
    elif kind == 'TemplateProcessing':
        for entry in processor['special_tokens'].values():
            entry['ids'] = [old_to_new[i] for i in entry['ids']]
    elif kind in ('RobertaProcessing', 'BertProcessing'):
        for key in ('sep', 'cls'):
            processor[key] = [processor[key][0], old_to_new[processor[key][1]]]


def _wrap_like(tokenizer, backend):
    """A tokenizer of the same class with the same special tokens and settings around the new backend."""
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _STALE_INIT_KWARGS}
    new = type(tokenizer)(tokenizer_object=backend, **kwargs)
    # Settings users change after loading live on the object, not in init_kwargs.
    for attr in ('model_max_length', 'padding_side', 'truncation_side'):
        setattr(new, attr, getattr(tokenizer, attr))
    return new


def _shrink_embeddings(model, order, old_to_new):
    """Keep the embedding rows of the kept ids in new-id order, in the input embeddings and in output
    embeddings (tied or not) when the model has them."""
    index = torch.tensor(order, dtype=torch.long)
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings() if hasattr(model, 'get_output_embeddings') else None
    rows = embeddings.weight.shape[0]
    tied = output is not None and output.weight is embeddings.weight
    # Edit the module in place: subclasses (scaled embeddings...) keep their extra behaviour.
    weight = embeddings.weight
    embeddings.weight = torch.nn.Parameter(weight.detach().index_select(0, index.to(weight.device)).clone(),
                                           requires_grad=weight.requires_grad)
    embeddings.num_embeddings = len(order)
    if getattr(embeddings, 'padding_idx', None) is not None:
        embeddings.padding_idx = old_to_new[embeddings.padding_idx]
    model.set_input_embeddings(embeddings)
    if output is None or output.weight.shape[0] != rows:
        return
    if tied:
        output.weight = embeddings.weight
    else:
        output.weight = torch.nn.Parameter(output.weight.detach().index_select(0, index.to(output.weight.device)))
    if getattr(output, 'bias', None) is not None and output.bias.shape[0] == rows:
        output.bias = torch.nn.Parameter(output.bias.detach().index_select(0, index.to(output.bias.device)))
    if hasattr(output, 'out_features'):
        output.out_features = len(order)
    # set_output_embeddings re-links heads that keep the bias in a second attribute (BERT's MLM head).
    model.set_output_embeddings(output)


def _remap_config(config, old_to_new, vocab_size):
    """New vocab_size and renumbered special-token ids in the model config."""
    config.vocab_size = vocab_size
    for field in CONFIG_TOKEN_ID_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value in old_to_new:
            setattr(config, field, old_to_new[value])
        elif isinstance(value, (list, tuple)):
            setattr(config, field, [old_to_new.get(i, i) for i in value])
