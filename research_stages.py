"""Stages as a shared tree: teacher -> {KD student, prune, quant} -> ... Each distinct stage runs once and
is stored on disk under `<cache_dir>/stages/`, keyed by a hash of every setting that produces it (and its
parent's key). Any pipeline, ablation or later run that needs the same stage reuses it; a changed setting
re-runs only the stages downstream of the change; an interrupted run resumes, because a stage counts as
stored only once its folder is complete.

What is *measured* (quality, size, latency) is never taken from the store: every stage is loaded back
from disk and evaluated in the current run, so speed-ups compare measurements taken side by side.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from research_compression_config import PIPELINE_CONFIGS, parse_student_layers
from research_errors import UsageError

COMPLETE_MARKER = 'STAGE_COMPLETE'
STAGE_FORMAT = 2  # bump when what a stored stage holds changes, so older stores are not misread
META_FILE = 'stage_meta.json'

# Settings that never change what a stage produces (where results go, how they are measured).
NOT_STAGE_SETTINGS = {
    'dataset_path', 'author_name', 'pipeline', 'run_ablation', 'ablation_pipelines', 'output_dir', 'save_all_stages',
    'overwrite_output_dir', 'cache_dir', 'threshold', 'latency_batch_size', 'latency_runs', 'seeds', 'run_full_kfold',
    'enable_kd', 'enable_pruning', 'enable_quantization', 'tool', 'reuse_stages', 'progress_bars',
    'allow_teacher_split_mismatch', 'measure_peak_memory', 'eval_fold', 'num_folds', 'seed', 'data_fraction', 'val_fraction', 'text_column',
}
# Settings of every training run (teacher, student, fine-tuning, QAT).
TRAINING_SETTINGS = ('batch', 'lr', 'warmup_ratio', 'weight_decay', 'gradient_clip_norm', 'dropout', 'early_stopping_patience',
                     'gradient_accumulation_steps', 'mixed_precision', 'max_length', 'label_columns', 'train_seed')
# Argument-name prefixes that belong to each stage kind; a new argument with such a prefix is keyed automatically.
STAGE_PREFIXES = {
    'teacher': ('teacher_',),
    'kd': ('kd_', 'student_', 'hidden_loss', 'attention_loss', 'epochs'),
    'prune': ('prune_', 'calibration_', 'fine_tune_'),
    'quant': ('quant_', 'int4_', 'fine_tune_'),
}


@dataclass
class StageNode:
    kind: str                  # teacher | kd | prune | quant
    key: str
    path: str
    meta: Dict = field(default_factory=dict)
    reused: bool = False


def file_fingerprint(path: str) -> str:
    """Cheap identity of a folder of model files: names, sizes and modification times."""
    entries = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            entries.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, int(stat.st_mtime)))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


def stage_settings(args, kind: str) -> Dict:
    prefixes = STAGE_PREFIXES[kind]
    settings = {k: v for k, v in vars(args).items()
                if k not in NOT_STAGE_SETTINGS and (k in TRAINING_SETTINGS or k.startswith(prefixes))}
    if kind == 'teacher' and args.teacher_checkpoint and os.path.isdir(args.teacher_checkpoint):
        settings['teacher_checkpoint_files'] = file_fingerprint(args.teacher_checkpoint)
    return settings


def stage_key(args, kind: str, parent_key: str, data_key: str = '') -> str:
    payload = {'format': STAGE_FORMAT, 'kind': kind, 'parent': parent_key, 'data': data_key,
               'settings': stage_settings(args, kind)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageStore:
    """Folders `<root>/<kind>-<key>/`; a folder counts only once its completion marker is written."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, f'{kind}-{key}')

    def load(self, kind: str, key: str) -> Optional[StageNode]:
        path = self.path(kind, key)
        if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            return None
        with open(os.path.join(path, META_FILE), encoding='utf-8') as fh:
            return StageNode(kind, key, path, json.load(fh), reused=True)

    def begin(self, kind: str, key: str) -> str:
        """An empty folder for a stage about to be produced (a half-written earlier attempt is discarded)."""
        path = self.path(kind, key)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def complete(self, kind: str, key: str, meta: Dict) -> StageNode:
        path = self.path(kind, key)
        with open(os.path.join(path, META_FILE), 'w', encoding='utf-8') as fh:
            json.dump(meta, fh, indent=2, default=str)
        open(os.path.join(path, COMPLETE_MARKER), 'w').close()
        return StageNode(kind, key, path, meta, reused=False)


def link_or_copy_tree(src: str, dst: str) -> None:
    """Copy a stored stage into the output folder; hard links where the filesystem allows (no extra disk)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(COMPLETE_MARKER, META_FILE, 'README.md'))


def load_torch_stage(node: StageNode):
    """(model, tokenizer) of a stored stage that is a PyTorch model (teacher, student, pruned)."""
    from research_inference import TorchClassifier, load_compressed_model
    classifier = load_compressed_model(node.path)
    if not isinstance(classifier, TorchClassifier):
        raise UsageError(f'stage {node.kind} at {node.path} is not a PyTorch model and cannot be trained further.')
    return classifier.model, classifier.tokenizer


def pipeline_chain(pipeline_config: Dict) -> List[str]:
    """Stage kinds a pipeline runs, in the fixed order teacher -> kd -> prune -> quant."""
    return ['teacher'] + [kind for kind, flag in (('kd', 'enable_kd'), ('prune', 'enable_pruning'),
                                                 ('quant', 'enable_quantization')) if pipeline_config[flag]]


STAGE_NAMES = {'teacher': 'baseline', 'kd': 'kd', 'prune': 'prune', 'quant': 'quant'}


# ---------------------------------------------------------------------------------------------
# Stage producers: each makes one stage from its parent and writes it into `path` (see research_stages)
# ---------------------------------------------------------------------------------------------

def stage_info(args, stage: str, data) -> Dict:
    return {'stage': stage, 'label_names': list(args.label_columns), 'max_length': args.max_length,
            'threshold': args.threshold, 'split': split_record(args, data)}


def split_record(args, data) -> Dict:
    """What identifies the data a model was trained on, so a later run can refuse a leaking teacher."""
    return {'data_content_hash': data.content_hash(), 'test_split_hash': data.test_split_hash, 'fold': data.fold,
            'num_folds': args.num_folds, 'seed': args.seed, 'data_fraction': args.data_fraction}


def check_teacher_split(args, data) -> None:
    """A checkpoint fine-tuned by this tool on another split of the same data has seen some of this run's
    test texts; scoring it here would inflate every metric. Refuse unless told otherwise."""
    from research_inference import INFO_FILE
    path = os.path.join(args.teacher_checkpoint, INFO_FILE)
    if args.allow_teacher_split_mismatch or not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as fh:
        trained_on = json.load(fh).get('split')
    if trained_on and trained_on['test_split_hash'] != data.test_split_hash:
        raise UsageError(
            f"--teacher_checkpoint '{args.teacher_checkpoint}' was fine-tuned by this tool with a different split "
            f"(data_fraction={trained_on['data_fraction']}, num_folds={trained_on['num_folds']}, fold={trained_on['fold']}, "
            f"seed={trained_on['seed']}) than this run (data_fraction={args.data_fraction}, num_folds={args.num_folds}, "
            f"fold={data.fold}, seed={args.seed}), so it has seen some of this run's test texts. Use the same "
            'data settings, or pass --allow_teacher_split_mismatch if you know the data are unrelated.')


def produce_teacher(args, data, path, parent=None, teacher=None) -> Dict:
    """The fine-tuned teacher: loaded from --teacher_checkpoint (head included), or fine-tuned here."""
    from research_data import positive_class_weights, tokenized_splits
    from research_inference import save_hf_classifier
    from research_models import load_encoder_for_classification, load_fine_tuned_classifier
    from research_pruning import linear_weight_roles
    from research_training import train_classifier
    if args.teacher_checkpoint:
        check_teacher_split(args, data)
        print(f'[teacher] loading fine-tuned checkpoint {args.teacher_checkpoint} (training skipped)')
        model, tokenizer = load_fine_tuned_classifier(args.teacher_checkpoint, args.label_columns)
    else:
        model, tokenizer = load_encoder_for_classification(args.teacher_path, args.label_columns, args.dropout)
        splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
        print(f'[teacher] fine-tuning {args.teacher_path} for up to {args.teacher_epochs} epochs')
        model, _ = train_classifier(model, tokenizer, splits.train, splits.val, positive_class_weights(data.labels[data.train_idx]),
                                    args, os.path.join(path, 'work'), args.teacher_epochs, args.lr)
    save_hf_classifier(model, tokenizer, path, stage_info(args, 'baseline', data))
    return {'linear_roles': linear_weight_roles(model)}


def produce_student(args, data, path, parent, teacher) -> Dict:
    """KD: the student (derived from the teacher with --student_layers, or --student_path) trained on the
    labels and the teacher's soft targets; each model reads its own tokenization of the same texts."""
    from research_data import positive_class_weights, tokenized_splits
    from research_inference import save_hf_classifier
    from research_kd import derive_student_from_teacher, distill_student
    from research_models import load_encoder_for_classification
    from research_pruning import linear_weight_roles
    teacher_model, teacher_tokenizer = load_torch_stage(teacher)
    if args.student_layers:
        student = derive_student_from_teacher(teacher_model, parse_student_layers(args.student_layers))
        student_tokenizer = teacher_tokenizer
    else:
        student, student_tokenizer = load_encoder_for_classification(args.student_path, args.label_columns, args.dropout)
    teacher_splits = tokenized_splits(data, teacher_tokenizer, args.max_length, args.cache_dir)
    student_splits = tokenized_splits(data, student_tokenizer, args.max_length, args.cache_dir)
    student, _ = distill_student(student, student_tokenizer, student_splits, teacher_model, teacher_tokenizer, teacher_splits,
                                 data, positive_class_weights(data.labels[data.train_idx]), args, os.path.join(path, 'work'))
    save_hf_classifier(student, student_tokenizer, path, stage_info(args, 'kd', data))
    return {'linear_roles': linear_weight_roles(student)}


def produce_pruned(args, data, path, parent, teacher) -> Dict:
    """Prune the parent (teacher or student), fine-tune with masks held, make masks permanent."""
    from research_data import positive_class_weights, tokenized_splits
    from research_pruning import linear_weight_roles, prune_and_fine_tune, save_pruned_classifier
    model, tokenizer = load_torch_stage(parent)
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    model, report = prune_and_fine_tune(model, tokenizer, splits, positive_class_weights(data.labels[data.train_idx]),
                                        args, os.path.join(path, 'work'))
    save_pruned_classifier(model, tokenizer, path, stage_info(args, 'prune', data))
    return {'linear_roles': linear_weight_roles(model), 'report': report}


def produce_quantized(args, data, path, parent, teacher) -> Dict:
    """Quantize the parent; the quantizer writes its own artifact (e.g. an int8 ONNX file)."""
    from research_data import positive_class_weights, tokenized_splits
    from research_inference import write_info
    from research_quantization import quantize_and_save
    model, tokenizer = load_torch_stage(parent)
    splits = tokenized_splits(data, tokenizer, args.max_length, args.cache_dir)
    saved = quantize_and_save(model, tokenizer, path, args, splits.train, splits.val,
                              positive_class_weights(data.labels[data.train_idx]))
    write_info(path, {**stage_info(args, 'quant', data), **saved})
    return {'linear_roles': parent.meta['linear_roles']}


STAGE_PRODUCERS = {'teacher': produce_teacher, 'kd': produce_student, 'prune': produce_pruned, 'quant': produce_quantized}


class StageRunner:
    """Runs each distinct stage once (reusing stored ones) and evaluates each once per run."""

    def __init__(self, args, data, store):
        self.args, self.data, self.store = args, data, store
        self.data_key = hashlib.sha256(json.dumps([data.content_hash(), data.test_split_hash, data.train_idx.tolist(),
                                                   data.val_idx.tolist()]).encode()).hexdigest()[:16]
        self.nodes: Dict[str, object] = {}
        self.evaluations: Dict[str, Dict] = {}
        self.events: List[Dict] = []
        self.visited, self.planned = 0, 0

    def key_chain(self, pipeline: str) -> List[tuple]:
        keys, parent = [], ''
        for kind in pipeline_chain(PIPELINE_CONFIGS[pipeline]):
            parent = stage_key(self.args, kind, parent, self.data_key)
            keys.append((kind, parent))
        return keys

    def node(self, kind: str, key: str, parent, teacher, where: str):
        from transformers import set_seed
        if key in self.nodes:
            return self.nodes[key]
        node = self.store.load(kind, key) if self.args.reuse_stages else None
        self.visited += 1
        print(f'\n[plan] stage {self.visited} of {self.planned} distinct{where}: {kind} ({key}) - '
              + ('reusing the stored stage' if node else 'running'))
        if node is None:
            set_seed(self.args.train_seed)  # a stage's randomness must not depend on what ran before it
            path = self.store.begin(kind, key)
            meta = STAGE_PRODUCERS[kind](self.args, self.data, path, parent, teacher)
            shutil.rmtree(os.path.join(path, 'work'), ignore_errors=True)
            node = self.store.complete(kind, key, meta)
        self.events.append({'kind': kind, 'key': key, 'reused': node.reused})
        self.nodes[key] = node
        return node

    def run_pipeline(self, pipeline: str, label: str = '') -> List[StageNode]:
        """The stage nodes of one pipeline, producing those not yet run or stored."""
        nodes, parent = [], None
        for kind, key in self.key_chain(pipeline):
            where = f' ({pipeline}{", " + label if label else ""})'
            parent = self.node(kind, key, parent, nodes[0] if nodes else None, where)
            nodes.append(parent)
        return nodes

    def plan(self, pipelines: List[str]) -> int:
        """Number of distinct stages the pipelines need (for the progress display)."""
        self.planned = len({key for p in pipelines for _, key in self.key_chain(p)})
        return self.planned

    def evaluate(self, node) -> Dict:
        """Load the stage back from disk and measure it: what is reported is what was saved."""
        if node.key in self.evaluations:
            return dict(self.evaluations[node.key])
        from research_data import tokenized_splits
        from research_eval import evaluate_saved_model, measure_peak_memory
        from research_inference import load_compressed_model
        from research_pruning import weight_names_in_group
        args = self.args
        classifier = load_compressed_model(node.path)
        test = tokenized_splits(self.data, classifier.tokenizer, args.max_length, args.cache_dir).test
        result = {'stage': STAGE_NAMES[node.kind]}
        if args.measure_peak_memory:
            result.update(measure_peak_memory(node.path, args.latency_batch_size, args.max_length,
                                               self.data.texts[int(self.data.test_idx[0])]))
            result['peak_memory_scope'] = (f'fresh process: runtimes imported, model loaded, one batch of '
                                           f'{args.latency_batch_size} x {args.max_length} tokens predicted')
        else:
            result.update({'peak_memory_mb': None, 'peak_memory_model_mb': None, 'peak_memory_scope': 'not measured (--no_peak_memory)'})
        result.update(evaluate_saved_model(classifier, node.path, test,
                                           weight_names_in_group(node.meta['linear_roles'], args.prune_layers), args.threshold,
                                           args.latency_batch_size, args.max_length, args.latency_runs))
        result.update(node.meta.get('report', {}))
        result.update({'stage_key': node.key, 'reused': node.reused})
        print(f'[eval] {result["stage"]}: macro-F1 {result["f1_macro"]:.4f}, {result["size_mb"]:.2f} MB on disk, '
              f'p50 {result["latency_ms_p50"]:.2f} ms (batch {args.latency_batch_size} x {args.max_length} tokens)')
        self.evaluations[node.key] = result
        return dict(result)
