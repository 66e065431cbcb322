"""Looking after --cache_dir: what it holds (--cache_report: the stage store's stages with the settings that
made them, the tokenization and teacher-logit caches, the disk use) and removing what is not used
(--cache_prune_older_than). Only the store's folders and those two caches' names are ever listed or removed.
"""

import os
import time
from typing import Dict, List

from research_compression_config import stage_summary
from research_data import TOKENIZATION_CACHE_PREFIX
from research_files import TEMPORARY_TAG, folder_size, remove_abandoned_temporaries, remove_entry
from research_kd import TEACHER_LOGITS_PREFIX
from research_stages import STORE_FOLDER, StageStore
from research_training import resumable_checkpoint


def cache_entries(cache_dir: str) -> List[Dict]:
    """The tokenization and teacher-logit caches in `cache_dir` (only those names: nothing else there is
    ever listed or removed), with size and last use (their modification time is renewed on every read)."""
    kinds = {TOKENIZATION_CACHE_PREFIX: 'tokenization', TEACHER_LOGITS_PREFIX: 'teacher logits'}
    rows = []
    for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        kind = next((k for prefix, k in kinds.items() if name.startswith(prefix) and TEMPORARY_TAG not in name), None)
        path = os.path.join(cache_dir, name)
        if kind and not os.path.islink(path):
            rows.append({'kind': kind, 'name': name, 'path': path, 'bytes': folder_size(path),
                         'last_used': os.path.getmtime(path)})
    return rows


def _when(timestamp) -> str:
    return '-' if not timestamp else time.strftime('%Y-%m-%d %H:%M', time.localtime(timestamp))


def cache_report(cache_dir: str) -> str:
    """What --cache_dir holds: every stage of the store (kind, key, size, when stored and last used, the settings
    that made it) and the tokenization/teacher-logit caches, with the disk use and how to prune."""
    store = StageStore.in_cache_dir(cache_dir, resumable=resumable_checkpoint)
    stages, caches = store.stored_stages(), cache_entries(cache_dir)
    mb = lambda n: f'{n / 2 ** 20:.1f}'
    lines = [f'Stage store {store.root}: {len(stages)} stage folder(s), {mb(sum(r["bytes"] for r in stages))} MB', '']
    if stages:
        lines.append(f'{"kind":<8} {"key":<16} {"MB":>8}  {"stored":<16}  {"last used":<16}  settings')
        for row in stages:
            state = '' if row['state'] == 'stored' else f'  [{row["state"]}]'
            lines.append(f'{row["kind"]:<8} {row["key"]:<16} {mb(row["bytes"]):>8}  {_when(row["stored"]):<16}  '
                         f'{_when(row["last_used"]):<16}  {stage_summary(row["kind"], row["settings"]) or "-"}{state}')
        lines.append('')
    for kind in ('tokenization', 'teacher logits'):
        rows = [r for r in caches if r['kind'] == kind]
        lines.append(f'{kind} caches: {len(rows)}, {mb(sum(r["bytes"] for r in rows))} MB'
                     + (f', last used {_when(max(r["last_used"] for r in rows))}' if rows else ''))
    lines += [f'Disk use of {cache_dir}: {mb(folder_size(cache_dir))} MB in all.', '',
              'To free space: python research_main.py --cache_dir DIR --cache_prune_older_than DAYS removes the stored '
              'stages and caches not used for DAYS days (0: all that no running run holds); or delete any '
              f'{STORE_FOLDER}/<kind>-<key> folder by hand. A removed stage is rebuilt when a run needs it again.']
    return '\n'.join(lines)


def prune_cache(cache_dir: str, older_than_days: float) -> str:
    """Remove the stages (never one a live run holds), caches and leftovers of dead runs not used for
    `older_than_days` days; returns what was freed."""
    store = StageStore.in_cache_dir(cache_dir)
    before = folder_size(cache_dir)
    leftovers = store.remove_abandoned() + remove_abandoned_temporaries(cache_dir)
    stages = store.remove_unused(older_than_days)
    cutoff = time.time() - older_than_days * 86400
    caches = [row for row in cache_entries(cache_dir) if row['last_used'] <= cutoff]
    for row in caches:
        remove_entry(row['path'])
    freed = (before - folder_size(cache_dir)) / 2 ** 20
    return (f'[cache] removed {len(stages)} stage(s), {len(caches)} cache(s) and {len(leftovers)} leftover(s) of '
            f'interrupted runs not used for {older_than_days:g} day(s): {freed:.1f} MB freed in {cache_dir}')
