"""Shared fixtures: tiny BERT models and tokenizers built in-process (no network), the shipped sample CSV,
and a helper that runs the CLI entry point in-process."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# Tiny models: one intra-op thread is faster than two (thread start-up dominates), and it keeps the suite
# fast when other jobs share the cores.
import torch  # noqa: E402
torch.set_num_threads(1)

SAMPLE_CSV = os.path.join(ROOT, 'data', 'sample_bangla_cyberbullying_synthetic.csv')
SHARED_CSV = os.path.join(ROOT, '..', 'shared', 'data', 'bangla_cyberbullying_5label.csv')
LABELS = ['bully', 'sexual', 'religious', 'threat', 'spam']


def sample_texts():
    import pandas as pd
    return pd.read_csv(SAMPLE_CSV)['comment'].astype(str).tolist()


def build_tokenizer(save_dir, vocab_size=400, lowercase=True):
    """A WordPiece tokenizer trained on the sample texts, saved in Hugging Face format."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    tok.train_from_iterator(sample_texts(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B [SEP]',
        special_tokens=[('[CLS]', tok.token_to_id('[CLS]')), ('[SEP]', tok.token_to_id('[SEP]'))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
                                   sep_token='[SEP]', mask_token='[MASK]')
    fast.save_pretrained(save_dir)
    return fast


def build_encoder(save_dir, tokenizer, hidden=32, layers=4, heads=4, intermediate=64, seed=0):
    """A tiny randomly initialised BERT encoder (no classification head), like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


@pytest.fixture(scope='session')
def tiny_teacher_dir(tmp_path_factory):
    """Tiny 4-layer, 96-wide, 4-head encoder (big enough that ONNX graph overhead does not dominate file sizes) with its own tokenizer."""
    path = str(tmp_path_factory.mktemp('tiny_teacher'))
    return build_encoder(path, build_tokenizer(path, vocab_size=400), hidden=96, layers=4, heads=4, intermediate=384)


@pytest.fixture(scope='session')
def tiny_student_dir(tmp_path_factory):
    """Tiny 2-layer, 24-wide, 2-head encoder with a *different* tokenizer (other vocabulary size)."""
    path = str(tmp_path_factory.mktemp('tiny_student'))
    return build_encoder(path, build_tokenizer(path, vocab_size=300), hidden=24, layers=2, heads=2, intermediate=48, seed=1)


def fast_args(output_dir, measure_memory=False, **overrides):
    """CLI arguments for a quick run on the sample CSV with tiny models (peak memory, which costs a fresh
    process per stage, only where a test asks for it)."""
    settings = {
        'dataset_path': SAMPLE_CSV, 'author_name': 'tests', 'output_dir': str(output_dir), 'num_folds': '1',
        'max_length': '32', 'batch': '16', 'lr': '5e-4', 'teacher_epochs': '2', 'epochs': '2', 'fine_tune_epochs': '1',
        'latency_runs': '3', 'latency_budget_s': '0', 'early_stopping_patience': '2',
    }
    settings.update({k: str(v) for k, v in overrides.items() if v is not None and v is not True})
    argv = []
    for key, value in settings.items():
        argv += [f'--{key}', value]
    argv += [f'--{k}' for k, v in overrides.items() if v is True]
    return argv if measure_memory else argv + ['--no_peak_memory']


def run_cli(argv):
    from research_main import main
    return main(argv)


@pytest.fixture(scope='session')
def teacher_checkpoint(tmp_path_factory, tiny_teacher_dir):
    """A fine-tuned tiny teacher (head included), made once by the baseline pipeline."""
    out = tmp_path_factory.mktemp('teacher_run')
    cache = tmp_path_factory.mktemp('cache')
    code = run_cli(fast_args(out, pipeline='baseline', teacher_path=tiny_teacher_dir, cache_dir=cache, teacher_epochs=3))
    assert code == 0
    return os.path.join(str(out), 'stages', 'baseline')


class FakeClock:
    """Stands in for the `time` module inside research_latency: stubs advance it by exact amounts."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    """A fake clock inside research_latency (the latency tests' stubs advance it)."""
    import research_latency
    fake = FakeClock()
    monkeypatch.setattr(research_latency, 'time', fake)
    return fake
