"""The stage store: every distinct stage of any run, kept on disk under `<cache_dir>/stages/` and keyed by
a hash of what produces it (its kind, its settings, its parent's key, the data it was trained on).

Any pipeline, ablation or later run that needs the same stage reuses it; a changed setting re-runs only
the stages downstream of the change; an interrupted run resumes, because a stage counts as stored only
once its completion marker is written. This module knows nothing of models or techniques: a stage is
produced by a callable that writes into a folder and returns its metadata.

What is *measured* (quality, size, latency) is never taken from the store: every stage is loaded back from
disk and evaluated in the current run, so speed-ups compare measurements taken side by side.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

from transformers import set_seed

COMPLETE_MARKER = 'STAGE_COMPLETE'
STAGE_FORMAT = 3  # bump when what a stored stage holds or how it is keyed changes, so older stores are not misread
META_FILE = 'stage_meta.json'
WORK_DIR = 'work'  # scratch space of a stage being produced (Trainer checkpoints), removed on completion


@dataclass
class StageNode:
    kind: str
    key: str
    path: str
    meta: Dict = field(default_factory=dict)
    reused: bool = False


def stage_key(kind: str, parent_key: str, data_key: str, settings: Dict) -> str:
    """The identity of a stage: what it is, what it was made from, on which data, with which settings."""
    payload = {'format': STAGE_FORMAT, 'kind': kind, 'parent': parent_key, 'data': data_key, 'settings': settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageStore:
    """Folders `<root>/<kind>-<key>/`; a folder counts only once its completion marker is written. Within one
    run each key is produced or loaded once (`nodes`), and every use is logged (`events`)."""

    def __init__(self, root: str, reuse: bool = True):
        self.root = root
        self.reuse = reuse
        os.makedirs(root, exist_ok=True)
        self.nodes: Dict[str, StageNode] = {}
        self.events: List[Dict] = []
        self.visited, self.planned = 0, 0

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
        shutil.rmtree(os.path.join(path, WORK_DIR), ignore_errors=True)
        with open(os.path.join(path, META_FILE), 'w', encoding='utf-8') as fh:
            json.dump(meta, fh, indent=2, default=str)
        open(os.path.join(path, COMPLETE_MARKER), 'w').close()
        return StageNode(kind, key, path, meta, reused=False)

    def plan(self, keys: Iterable[str]) -> None:
        """How many distinct stages the run needs (for the progress display)."""
        self.planned = len(set(keys))
        self.visited = 0

    def get_or_run(self, kind: str, key: str, produce: Callable[[str], Dict], seed: int, where: str = '') -> StageNode:
        """The stored stage `kind-key`, produced by `produce(folder) -> meta` (with the seed set, so its
        randomness never depends on what ran before it) when it is not stored yet."""
        if key in self.nodes:
            return self.nodes[key]
        node = self.load(kind, key) if self.reuse else None
        self.visited += 1
        print(f'\n[plan] stage {self.visited} of {self.planned} distinct{where}: {kind} ({key}) - '
              + ('reusing the stored stage' if node else 'running'))
        if node is None:
            set_seed(seed)
            path = self.begin(kind, key)
            node = self.complete(kind, key, produce(path))
        self.events.append({'kind': kind, 'key': key, 'reused': node.reused})
        self.nodes[key] = node
        return node


def copy_stage(node: StageNode, target: str) -> None:
    """Copy a stored stage's model files into `target` (its marker, metadata and card stay in the store);
    hard links where the filesystem allows (no extra disk)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(node.path, target, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(COMPLETE_MARKER, META_FILE, 'README.md'))
