"""Data-parallel runs through the usual launchers (`torchrun`, `accelerate launch`): which process is the main
one, and how the others wait for it.

Every process runs the same plan. The main process (rank 0) alone prepares the output folder, decides from the
stage store whether a stage must be produced, writes stores, caches, exports and results, and measures; the
others follow its decisions (`broadcast`) and wait at barriers. Training is the one thing all processes do
together: the Hugging Face `Trainer` runs DDP by itself when the process group exists.

Waiting for the main process (it may evaluate, export or wait for another run's lock for a long time) goes
through a separate gloo group with a long timeout, so it never trips the training backend's timeout.
Synchronising helpers that code below the plan calls (tokenization, the teacher-logit cache) synchronise
only inside a section every process runs (`all_processes()`); elsewhere the main process runs alone and
they do nothing.
"""

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from accelerate import PartialState

from research_errors import UsageError

WAIT_TIMEOUT = datetime.timedelta(days=2)   # how long a process waits for the main process at a barrier

_state = {'group': None, 'together': False}


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 under plain `python`)."""
    return int(os.environ.get('WORLD_SIZE', '1') or 1)


def process_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get('RANK', '0') or 0)


def is_main_process() -> bool:
    return process_rank() == 0


def is_distributed() -> bool:
    """True once `start()` joined a process group of several processes."""
    return _state['group'] is not None


def check_launch() -> None:
    """Several GPUs under plain `python` would make the Trainer use `torch.nn.DataParallel` (one process,
    replicas per batch): slower than DDP, and the distillation's online teacher and hidden-state projections
    are not replicated with it. Refused, saying how to launch instead."""
    if launched_processes() > 1 or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count > 1:
        raise UsageError(
            f'{count} CUDA GPUs are visible to a plain `python` run; this tool trains on several GPUs only as one '
            f'process per GPU (DDP). Use all of them with `torchrun --standalone --nproc_per_node {count} '
            f'research_main.py ...` (or `accelerate launch --multi_gpu --num_processes {count} research_main.py ...`), '
            'or one of them with `CUDA_VISIBLE_DEVICES=0 python research_main.py ...`.')


def start() -> None:
    """Join the process group the launcher described (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment),
    before the first Trainer exists, so barriers work from the start: accelerate's `PartialState` picks NCCL
    with one GPU per process, gloo on CPUs. Does nothing under plain `python`."""
    if launched_processes() <= 1 or is_distributed():
        return
    if not dist.is_initialized():
        PartialState(cpu=not torch.cuda.is_available())   # (without cpu=True accelerate starts no group on CPUs)
    _state['group'] = dist.new_group(backend='gloo', timeout=WAIT_TIMEOUT)


def finish() -> None:
    """Wait for every process, then leave the process group."""
    if not is_distributed():
        return
    barrier()
    _state['group'] = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Every process waits here until all have arrived (nothing under plain `python`)."""
    if is_distributed():
        dist.barrier(group=_state['group'])


# Not accelerate's broadcast_object_list: it uses the default (NCCL) group, whose timeout a main process that
# waits for another run's lock or evaluates for long would trip; this goes through the long-timeout gloo group.
def broadcast(value: Any = None) -> Any:
    """The main process's `value` (any picklable object), returned on every process."""
    if not is_distributed():
        return value
    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_state['group'])
    return box[0]


@contextlib.contextmanager
def all_processes() -> Iterator[None]:
    """A section that every process runs (a stage trained together): `main_process_first` synchronises in it."""
    before = _state['together']
    _state['together'] = True
    try:
        yield
    finally:
        _state['together'] = before


def in_all_processes() -> bool:
    return is_distributed() and _state['together']


# Not PartialState().main_process_first(): it waits on the default group's timeout and synchronises everywhere,
# where this waits on the long-timeout gloo group and only inside all_processes() (elsewhere the main runs alone).
@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Inside `all_processes()`: the main process runs the block first (e.g. builds a cache), the others run
    it after it (and read what it wrote). Elsewhere the block just runs."""
    if not in_all_processes():
        yield
        return
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()
