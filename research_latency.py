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
being a median, it is not moved by a few stalled calls.

How long to time is decided by the numbers, not by a round count alone: after the minimum rounds, timing goes
on in whole cycles until every speed-up's 95% bootstrap interval (whole cycles resampled, so what a cycle
shares stays together) lies within +-5% of its value, and the baseline's median latency's too, or until a
time budget is spent. A fixed 30 rounds flagged every stage of the quick start noisy even on an idle 2-core
machine (baseline IQR/median 0.29 > 0.15): a spread describes the distribution, not how well its median is
known, so the flag always fired and taught users to ignore it. Now only a stage that did not converge within
the budget is flagged (`latency_noisy` = not `latency_converged`, with a `latency_warning` sentence), and
every speed-up carries its interval.

Thread policy: every runtime is timed with the same number of intra-op threads, `intra_op_threads(n)` for
PyTorch and `onnxruntime_session_options(n)` for ONNX Runtime; the caller records n next to the numbers.

`compressed_size_mb` is the size of the weight files as a user would ship them: one zip archive, DEFLATE
level 6 (stdlib zipfile/zlib, one method so numbers compare across machines); zeros left by unstructured
pruning compress, so this is what sparsity buys in storage.

This module imports nothing of the project but research_errors; it times plain callables (see `make_timer`).
"""

import contextlib
import math
import os
import statistics
import tempfile
import time
import zipfile
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from research_errors import UsageError

# Files that hold model weights: what research_eval.size_on_disk_mb counts and compressed_size_mb zips.
WEIGHT_FILE_SUFFIXES = ('.safetensors', '.onnx', '.onnx_data', '.bin', '.pt', '.gguf')

# The one compression method of compressed_size_mb: zip, DEFLATE, level 6 (zip's and gzip's default).
ZIP_COMPRESSION = zipfile.ZIP_DEFLATED
ZIP_LEVEL = 6

# Convergence: timing goes on, in whole rotation cycles, until every stage's tracked number (its speed-up
# against the baseline; the baseline's own median latency) has a 95% bootstrap interval within
# +-DEFAULT_TOLERANCE of its value, or the time budget is spent.
DEFAULT_TOLERANCE = 0.05
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# Fewer whole cycles than this and an interval over cycles means little (5 cycles give 5 distinct medians at
# most): such a stage is never called converged.
MIN_CYCLES = 5
# Convergence is checked again once the cycles have grown by this factor (a check resamples every cycle, so
# checking after every cycle would cost more than the timing on fast stages).
CHECK_GROWTH = 1.1
# The sort-only pre-check lets through intervals up to this factor wider than the tolerance, since the
# bootstrap over whole cycles, which decides, can be narrower than an interval that treats rounds as iid.
PRECHECK_SLACK = 1.5
# Timing stops after this many convergence checks in a row found every stage converged.
CONFIRMATIONS = 2
# Resampled elements held at once (about 32 MB of float64).
_BOOTSTRAP_BLOCK = 4_000_000


def _iqr(values: np.ndarray) -> float:
    q75, q25 = np.percentile(values, [75, 25])
    return float(q75 - q25)


def bootstrap_median_interval(per_cycle: np.ndarray, confidence: float = CONFIDENCE,
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the median over whole rotation cycles (Efron & Tibshirani 1993, ch. 13).

    `per_cycle` is [cycles] (one number per cycle, e.g. the cycle's time ratio) or [cycles, k] (k numbers per
    cycle, e.g. a stage's k round times): each resample draws `cycles` whole cycles with replacement (seeded
    numpy generator) and takes the median of everything drawn, so what a cycle shares (background load, the
    rotation's positions) stays together. Vectorised in blocks; no Python loop over resamples."""
    values = np.asarray(per_cycle, dtype=float)
    values = values.reshape(len(values), -1)
    cycles = len(values)
    if cycles == 0:
        return float('nan'), float('nan')
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // values.size)
    medians = []
    for start in range(0, resamples, block):
        picks = rng.integers(0, cycles, size=(min(block, resamples - start), cycles))
        medians.append(np.median(values[picks].reshape(len(picks), -1), axis=1))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(medians), [alpha, 1.0 - alpha])
    return float(low), float(high)


def _within(estimate: float, low: float, high: float, tolerance: float) -> bool:
    """The interval lies inside estimate * (1 +- tolerance)."""
    return bool(estimate > 0 and low >= estimate * (1 - tolerance) and high <= estimate * (1 + tolerance))


def _cycle_matrix(times, n: int, cycles: int) -> np.ndarray:
    """A stage's round times of the first `cycles` whole cycles, [cycles, n] seconds."""
    return np.asarray(times[:cycles * n], dtype=float).reshape(cycles, n)


def _tracked_values(times: Dict[str, list], name: str, n: int, cycles: int, baseline: Optional[str]) -> np.ndarray:
    """What a stage converges on, per whole cycle: with a baseline, its speed-up in each cycle (summed baseline
    time / summed stage time, [cycles]); the baseline itself, or every stage without one, its round times
    ([cycles, n] seconds), whose median is its latency."""
    matrix = _cycle_matrix(times[name], n, cycles)
    if baseline is None or name == baseline:
        return matrix
    # A stage that took no measurable time is given 1 ns rather than dividing by 0.
    return _cycle_matrix(times[baseline], n, cycles).sum(axis=1) / np.maximum(matrix.sum(axis=1), 1e-9)


def tracked_intervals(times: Dict[str, list], n: int, baseline: Optional[str], confidence: float = CONFIDENCE,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Dict[str, Tuple[float, float, float]]:
    """(value, interval low, interval high) of the number each stage converges on (`_tracked_values`), over
    its whole cycles, the interval by `bootstrap_median_interval`."""
    cycles = min(len(t) for t in times.values()) // n
    out = {}
    for name in times:
        values = _tracked_values(times, name, n, cycles, baseline)
        value = float(np.median(values)) if cycles else float('nan')
        out[name] = (value, *bootstrap_median_interval(values, confidence, resamples, seed))
    return out


def order_statistic_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Distribution-free interval of the median of iid values (the order statistics whose ranks are
    n/2 -+ z sqrt(n)/2, the normal approximation of the binomial; Conover 1999, 3.2): a sort, no resampling."""
    ordered = np.sort(np.asarray(values, dtype=float).ravel())
    half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(len(ordered)) / 2
    low = max(0, math.floor(len(ordered) / 2 - half))
    high = min(len(ordered) - 1, math.ceil(len(ordered) / 2 + half))
    return float(ordered[low]), float(ordered[high])


def _all_converged(times, n: int, baseline: Optional[str], tolerance: float, confidence: float, resamples: int,
                   seed: int) -> bool:
    """Every stage converged, by the bootstrap (what is reported). A sort-only interval of each stage is
    looked at first, and a stage clearly not converged by it ends the check without resampling: a check
    during the timing then costs next to nothing until the numbers are close."""
    cycles = min(len(t) for t in times.values()) // n
    if cycles < MIN_CYCLES:
        return False
    tracked = {name: _tracked_values(times, name, n, cycles, baseline) for name in times}
    for values in tracked.values():
        value = float(np.median(values))
        if not _within(value, *order_statistic_interval(values, confidence), tolerance * PRECHECK_SLACK):
            return False
    return all(_within(float(np.median(values)), *bootstrap_median_interval(values, confidence, resamples, seed),
                       tolerance) for values in tracked.values())


def _check_arguments(timers, rounds: int, baseline: Optional[str], budget_s: Optional[float], tolerance: float) -> None:
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
    if budget_s is not None and budget_s < 0:
        raise UsageError(f'measure_interleaved: budget_s must be 0 or more seconds, got {budget_s}.')
    if not 0 < tolerance < 1:
        raise UsageError(f'measure_interleaved: tolerance must be in (0, 1), got {tolerance}.')


def _timed_rounds(timers, rounds: int, warmup: int, budget_s: Optional[float], keep_going) -> Tuple[Dict[str, list], int]:
    """Warm-up, then `rounds` timed rounds (stage order rotated each round); with `budget_s`, more whole
    cycles until `keep_going(times)` is False or the next cycle, as long as the longest so far, would end past
    `budget_s` seconds after the start (warm-up included). Returns ({stage: seconds per round}, rounds run)."""
    names, started = list(timers), time.perf_counter()
    n = len(names)
    for w in range(warmup):
        for i in range(n):
            timers[names[(w + i) % n]]()
    times = {name: [] for name in names}
    done, checked_cycles, longest_cycle_s, cycle_started = 0, 0, 0.0, time.perf_counter()
    while True:
        if done >= rounds and (budget_s is None or done % n == 0):
            if budget_s is None:
                break
            if done // n >= max(MIN_CYCLES, checked_cycles * CHECK_GROWTH):
                checked_cycles = done // n
                if not keep_going(times):
                    break
            if time.perf_counter() - started + longest_cycle_s > budget_s:
                break
        if done % n == 0:
            cycle_started = time.perf_counter()
        for i in range(n):
            name = names[(done + i) % n]
            t0 = time.perf_counter()
            timers[name]()
            times[name].append(time.perf_counter() - t0)
        done += 1
        if done % n == 0:
            longest_cycle_s = max(longest_cycle_s, time.perf_counter() - cycle_started)
    return times, done


def measure_interleaved(timers: Dict[str, Callable[[], None]], rounds: int, warmup: int = 3,
                        baseline: Optional[str] = None, budget_s: Optional[float] = None,
                        tolerance: float = DEFAULT_TOLERANCE, confidence: float = CONFIDENCE,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Dict[str, Dict]:
    """Time every callable of `timers` once per round, all of them in every round, for at least `rounds`
    rounds, and with `budget_s` until the numbers converge.

    Round r calls the stages in their given order rotated to start at stage r mod n, so no stage is always
    first or last; n consecutive rounds from a multiple of n form a rotation cycle, in which every stage ran
    once in every position. `warmup` untimed rounds (same rotation) come first. Without `budget_s` exactly
    `rounds` rounds run. With it, timing goes on in whole cycles until every stage has converged (see
    `tracked_intervals`: its `confidence` bootstrap interval over at least MIN_CYCLES cycles lies within
    +-`tolerance` of its value), or until the next cycle would end past `budget_s` seconds after the call
    began (warm-up included); the `rounds` minimum is run whatever the budget.

    Returns {stage: metrics}, plain JSON-ready values:
      latency_ms_mean, latency_ms_p50 (median), latency_ms_p95, latency_ms_p99, latency_ms_iqr (ms);
      latency_ms_p50_ci_low/_high (bootstrap over whole cycles); latency_spread = IQR / median;
      latency_rounds, latency_seconds (wall time of the whole call), cycle_seconds (the stage's summed time per
        whole cycle, for `cycle_ratio`);
      with `baseline`: speedup = median over cycles of sum(baseline times) / sum(stage times) in that cycle,
        speedup_ci_low/_high (its interval), speedup_iqr, speedup_cycles, speedup_baseline; the baseline
        itself gets speedup 1.0 and the interval [1, 1];
      latency_converged (the stage's tracked number met the tolerance over at least MIN_CYCLES cycles),
      latency_noisy = not latency_converged, latency_warning: a sentence when not converged, else None.
    """
    _check_arguments(timers, rounds, baseline, budget_s, tolerance)
    started = time.perf_counter()
    n = len(timers)
    streak = {'converged_checks': 0}

    def keep_going(times_so_far) -> bool:
        # Stopping the first time an interval is narrow enough picks intervals that happen to be narrow (95%
        # intervals then held the true ratio in 90% of simulated runs); requiring two checks in a row, at least
        # CHECK_GROWTH more cycles apart, brings that back up (see docs/measurement.md).
        converged = _all_converged(times_so_far, n, baseline, tolerance, confidence, resamples, seed)
        streak['converged_checks'] = streak['converged_checks'] + 1 if converged else 0
        return streak['converged_checks'] < CONFIRMATIONS

    times, done = _timed_rounds(timers, rounds, warmup, budget_s, keep_going)
    context = {'rounds': done, 'cycles': done // n, 'seconds': time.perf_counter() - started, 'n': n,
               'tolerance': tolerance, 'budget_s': budget_s, 'confidence': confidence, 'resamples': resamples,
               'seed': seed, 'baseline': baseline}
    intervals = tracked_intervals(times, n, baseline, confidence, resamples, seed)
    results = {name: _stage_latency(times[name], context) for name in timers}
    for name in timers:
        if baseline is not None:
            results[name].update(_stage_speedup(name, results, intervals[name], context))
        results[name].update(_convergence(name, intervals[name], context))
    return results


def _none_if_nan(value: float) -> Optional[float]:
    return None if value != value else float(value)


def _stage_latency(seconds: list, context: Dict) -> Dict:
    """A stage's own latency statistics (ms) over all its rounds; the median's interval over whole cycles."""
    ms = np.asarray(seconds) * 1000.0
    p50, iqr = float(np.percentile(ms, 50)), _iqr(ms)
    per_cycle = _cycle_matrix(seconds, context['n'], context['cycles'])
    low, high = bootstrap_median_interval(per_cycle * 1000.0, context['confidence'], context['resamples'],
                                          context['seed'])
    return {
        'latency_ms_mean': float(ms.mean()), 'latency_ms_p50': p50,
        'latency_ms_p95': float(np.percentile(ms, 95)), 'latency_ms_p99': float(np.percentile(ms, 99)),
        'latency_ms_iqr': iqr, 'latency_spread': iqr / p50 if p50 > 0 else float('inf'),
        'latency_ms_p50_ci_low': _none_if_nan(low), 'latency_ms_p50_ci_high': _none_if_nan(high),
        'latency_rounds': int(context['rounds']), 'latency_seconds': float(context['seconds']),
        'cycle_seconds': per_cycle.sum(axis=1).tolist(),   # for ratios against other stages (cycle_ratio)
    }


def _stage_speedup(name: str, results: Dict[str, Dict], interval: Tuple[float, float, float], context: Dict) -> Dict:
    baseline = context['baseline']
    ratios = np.asarray(results[baseline]['cycle_seconds']) / np.maximum(np.asarray(results[name]['cycle_seconds']), 1e-9)
    if name == baseline:
        speedup, low, high = 1.0, 1.0, 1.0
    else:
        speedup, low, high = interval
    return {'speedup': float(speedup), 'speedup_ci_low': float(low), 'speedup_ci_high': float(high),
            'speedup_iqr': _iqr(ratios) if name != baseline else 0.0,
            'speedup_cycles': int(context['cycles']), 'speedup_baseline': baseline}


def _convergence(name: str, interval: Tuple[float, float, float], context: Dict) -> Dict:
    """latency_converged / latency_noisy / latency_warning of one stage."""
    value, low, high = interval
    converged = context['cycles'] >= MIN_CYCLES and _within(value, low, high, context['tolerance'])
    warning = None
    if not converged:
        speed = context['baseline'] is not None and name != context['baseline']
        what = (f"speed-up vs '{context['baseline']}' {value:.2f}x" if speed
                else f'median latency {value * 1000:.3g} ms')
        if context['cycles'] < MIN_CYCLES:
            why = f"only {context['cycles']} whole rotation cycle(s), fewer than the {MIN_CYCLES} an interval needs"
        else:
            half = max(value - low, high - value) / value if value > 0 else float('inf')
            why = (f"{context['confidence']:.0%} interval [{low * (1 if speed else 1000):.3g}, "
                   f"{high * (1 if speed else 1000):.3g}] is +-{half:.1%} > +-{context['tolerance']:.0%}")
        budget = (f"the {context['budget_s']:g} s budget" if context['budget_s'] is not None else 'a fixed round count')
        warning = (f"'{name}' timing did not converge within {budget} ({context['rounds']} rounds, "
                   f"{context['seconds']:.1f} s): {what}, {why}. Background load or frequency scaling; re-measure on "
                   'an idle machine or allow more time (--latency_budget_s).')
    return {'latency_converged': bool(converged), 'latency_noisy': not converged, 'latency_warning': warning}


def cycle_ratio(numerator: Dict, denominator: Dict, seed: int = 0) -> Dict[str, float]:
    """Median, IQR and 95% bootstrap interval over rotation cycles of numerator time / denominator time, for
    two stages of one `measure_interleaved` call (e.g. the same model at fp32 and at int8 in one runtime)."""
    ratios = np.asarray(numerator['cycle_seconds']) / np.maximum(np.asarray(denominator['cycle_seconds']), 1e-9)
    median = float(np.median(ratios))
    low, high = bootstrap_median_interval(ratios, seed=seed)
    return {'ratio': median, 'iqr': _iqr(ratios), 'rel_spread': _iqr(ratios) / median if median > 0 else float('inf'),
            'ci_low': low, 'ci_high': high}


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
