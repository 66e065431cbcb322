"""Latency and shipped-size measurement of compressed stages: interleaved timing, the thread policy, zipped weight size.

Timing one stage after another lets background load land on whichever stage happens to be timed (a
2-layer student was once reported 7.7x slower than its teacher while two busy processes shared the two
cores). `measure_interleaved` times every stage once per round, all stages in every round, rotating the
order, and reports the speed-up against a baseline from times taken together: load that slows one stretch
of the run slows both sides of the ratio taken over that stretch, so it cancels.

The stretch is one rotation cycle (n rounds for n stages, every stage once in every position), not a single
round. On an oversubscribed machine the scheduler's time slices (milliseconds) phase-lock with the rounds
and land on one position of the round more than the other, so single-round ratios are bimodal by position
(one run of 2 ms / 6 ms CPU stubs beside two CPU burners: median 2.2 in rounds where the slow stage ran
first, 8.6 where the fast one did, true ratio 3.0) and their median lands on either mode: 1.5x to 8.6x,
more than 15% off in 36 of 80 runs of 120 rounds. The median over cycles of sum(baseline) / sum(stage) was
more than 15% off in 2 of 105 such runs, and in none of 57 runs of 4 ms / 12 ms stubs (at most 12.7%);
being a median, it is not moved by a few stalled calls. A stage whose numbers still vary too much is flagged
(`latency_noisy`, `latency_warning`), never reported as a silent number.

Thread policy: every runtime is timed with the same number of intra-op threads, `intra_op_threads(n)` for
PyTorch and `onnxruntime_session_options(n)` for ONNX Runtime; the caller records n next to the numbers.

`compressed_size_mb` is the size of the weight files as a user would ship them: one zip archive, DEFLATE
level 6 (stdlib zipfile/zlib, one method so numbers compare across machines); zeros left by unstructured
pruning compress, so this is what sparsity buys in storage.

This module imports nothing of the project but research_errors; it times plain callables (see `make_timer`).
"""

import contextlib
import os
import tempfile
import time
import zipfile
from typing import Callable, Dict, Iterator, Optional

import numpy as np

from research_errors import UsageError

# Files that hold model weights: what research_eval.size_on_disk_mb counts and compressed_size_mb zips.
WEIGHT_FILE_SUFFIXES = ('.safetensors', '.onnx', '.onnx_data', '.bin', '.pt', '.gguf')

# The one compression method of compressed_size_mb: zip, DEFLATE, level 6 (zip's and gzip's default).
ZIP_COMPRESSION = zipfile.ZIP_DEFLATED
ZIP_LEVEL = 6

# With a time budget, at least this many rounds are run, whatever the budget.
MIN_ROUNDS = 5


def _iqr(values: np.ndarray) -> float:
    q75, q25 = np.percentile(values, [75, 25])
    return float(q75 - q25)


def measure_interleaved(timers: Dict[str, Callable[[], None]], rounds: int, warmup: int = 3,
                        baseline: Optional[str] = None, noise_bound: float = 0.15,
                        max_seconds: Optional[float] = None) -> Dict[str, Dict]:
    """Time every callable of `timers` once per round, all of them in every round, for `rounds` rounds.

    Round r calls the stages in their given order rotated to start at stage r mod n, so no stage is always
    first or last; n consecutive rounds from a multiple of n form a rotation cycle, in which every stage ran
    once in every position. `warmup` untimed rounds (same rotation) come first. With `max_seconds`, no
    further round starts once that many seconds have passed since the call began (warm-up included), but
    at least MIN_ROUNDS (5) rounds are run and the run ends on a whole cycle; `latency_rounds` records how
    many rounds were run (at most `rounds`).

    Returns {stage: metrics}, plain JSON-ready values:
      latency_ms_mean, latency_ms_p50 (median), latency_ms_p95, latency_ms_p99, latency_ms_iqr (ms);
      latency_spread = latency_ms_iqr / latency_ms_p50; latency_rounds (int); cycle_seconds (the stage's
        summed time per whole rotation cycle, for `cycle_ratio`);
      with `baseline`: speedup = median over rotation cycles of sum(baseline times) / sum(stage times)
        in that cycle (for one stage a cycle is one round); speedup_iqr (interquartile range of the cycle
        ratios), speedup_rel_spread = speedup_iqr / speedup, speedup_cycles (whole cycles used; rounds of
        a last, partial cycle count in the latencies only), speedup_baseline (the baseline's name); the
        baseline itself gets speedup 1.0;
      latency_noisy (bool): latency_spread or speedup_rel_spread exceeds `noise_bound`;
      latency_warning: a sentence saying which spread and by how much when noisy, else None.
    """
    names = list(timers)
    if not names:
        raise UsageError('measure_interleaved: no stages to time (timers is empty).')
    if rounds < 1:
        raise UsageError(f'measure_interleaved: rounds must be at least 1, got {rounds}.')
    if baseline is not None and baseline not in timers:
        raise UsageError(f"measure_interleaved: baseline '{baseline}' is not one of the stages ({', '.join(names)}).")
    if baseline is not None and rounds < len(names):
        raise UsageError(f'measure_interleaved: a speed-up needs at least one rotation cycle, i.e. rounds >= the '
                         f'number of stages ({len(names)}); got rounds={rounds}.')
    started = time.perf_counter()
    n = len(names)
    for w in range(warmup):
        for i in range(n):
            timers[names[(w + i) % n]]()

    times = {name: [] for name in names}  # seconds, one per round
    done = 0
    while done < rounds:
        if (max_seconds is not None and done >= MIN_ROUNDS and done % n == 0
                and time.perf_counter() - started > max_seconds):
            break
        for i in range(n):
            name = names[(done + i) % n]
            fn = timers[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        done += 1

    results = {}
    cycles = done // n
    # Sum over each whole rotation cycle: [cycles] seconds per stage.
    cycle_sums = {name: np.asarray(times[name][:cycles * n]).reshape(cycles, n).sum(axis=1) for name in names}
    base_times = cycle_sums[baseline] if baseline is not None else None
    for name in names:
        ms = np.asarray(times[name]) * 1000.0
        p50 = float(np.percentile(ms, 50))
        iqr = _iqr(ms)
        stage = {
            'latency_ms_mean': float(ms.mean()),
            'latency_ms_p50': p50,
            'latency_ms_p95': float(np.percentile(ms, 95)),
            'latency_ms_p99': float(np.percentile(ms, 99)),
            'latency_ms_iqr': iqr,
            'latency_spread': iqr / p50 if p50 > 0 else float('inf'),
            'latency_rounds': int(done),
            'cycle_seconds': cycle_sums[name].tolist(),   # for ratios against other stages (cycle_ratio)
        }
        problems = []
        if stage['latency_spread'] > noise_bound:
            problems.append(f"latency IQR/median {stage['latency_spread']:.2f} > {noise_bound:.2f} "
                            f"(p50 {p50:.3g} ms, IQR {iqr:.3g} ms)")
        if base_times is not None:
            # Per-cycle ratio; a stage that took no measurable time is given 1 ns rather than dividing by 0.
            ratios = base_times / np.maximum(cycle_sums[name], 1e-9)
            speedup = float(np.median(ratios))
            speedup_iqr = _iqr(ratios)
            stage.update({
                'speedup': speedup,
                'speedup_iqr': speedup_iqr,
                'speedup_rel_spread': speedup_iqr / speedup if speedup > 0 else float('inf'),
                'speedup_cycles': int(cycles),
                'speedup_baseline': baseline,
            })
            if stage['speedup_rel_spread'] > noise_bound:
                problems.append(f"speed-up vs '{baseline}' {speedup:.2f}x has IQR/median over {cycles} cycles "
                                f"{stage['speedup_rel_spread']:.2f} > {noise_bound:.2f}")
        stage['latency_noisy'] = bool(problems)
        stage['latency_warning'] = (
            f"'{name}' timing is noisy over {done} rounds: " + '; '.join(problems)
            + '. Background load or frequency scaling; re-measure on an idle machine or with more rounds.'
        ) if problems else None
        results[name] = stage
    return results


def cycle_ratio(numerator: Dict, denominator: Dict) -> Dict[str, float]:
    """Median and IQR over rotation cycles of numerator time / denominator time, for two stages of one
    `measure_interleaved` call (e.g. the same model at fp32 and at int8 in one runtime)."""
    ratios = np.asarray(numerator['cycle_seconds']) / np.maximum(np.asarray(denominator['cycle_seconds']), 1e-9)
    median = float(np.median(ratios))
    return {'ratio': median, 'iqr': _iqr(ratios), 'rel_spread': _iqr(ratios) / median if median > 0 else float('inf')}


def make_timer(classifier, batch: dict) -> Callable[[], None]:
    """A callable for `measure_interleaved` that runs `classifier.logits(batch)` once (result discarded).
    `classifier` is anything with a `logits(batch)` method, e.g. a research_inference.CompressedClassifier."""
    def run() -> None:
        classifier.logits(batch)
    return run


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the block with `torch.set_num_threads(n)`; the previous count is restored on exit (also on error).
    ONNX Runtime sessions take their count at creation instead: `onnxruntime_session_options(n)`."""
    import torch
    if int(n) < 1:
        raise UsageError(f'intra-op threads must be at least 1, got {n}.')
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(previous)


def onnxruntime_session_options(n: int):
    """`ort.SessionOptions` for timing: `n` intra-op threads, one inter-op thread, sequential execution."""
    import onnxruntime as ort
    if int(n) < 1:
        raise UsageError(f'intra-op threads must be at least 1, got {n}.')
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(n)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def compressed_size_mb(model_dir: str) -> float:
    """Megabytes (10^6 bytes) of one zip archive of the weight files in `model_dir` (WEIGHT_FILE_SUFFIXES,
    subfolders included), DEFLATE level 6 via the stdlib zipfile, written to an anonymous temporary file
    that is deleted on return. 0.0 when the folder holds no weight files. Same method on every machine, so
    numbers compare across runs; zeros of unstructured pruning compress, dense random weights barely do."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"compressed_size_mb: '{model_dir}' is not a folder.")
    paths = []
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        paths.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(WEIGHT_FILE_SUFFIXES))
    if not paths:
        return 0.0
    with tempfile.TemporaryFile() as tmp:
        with zipfile.ZipFile(tmp, 'w', compression=ZIP_COMPRESSION, compresslevel=ZIP_LEVEL, allowZip64=True) as zf:
            for path in paths:
                zf.write(path, arcname=os.path.relpath(path, model_dir))
        tmp.seek(0, os.SEEK_END)
        return tmp.tell() / 1e6
