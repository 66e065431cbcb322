"""research_latency: timing goes on until every speed-up's 95% interval over rotation cycles is within the
tolerance, or the time budget is spent; only what did not converge is flagged noisy.

Stages are fake timers that advance a fake clock by amounts drawn from known distributions, so the true
speed-up is known and the budget arithmetic is exact; one test uses the real clock to check the cap holds."""

import time

import numpy as np
import pytest

from research_latency import MIN_CYCLES, bootstrap_median_interval, measure_interleaved




def lognormal_stub(clock, median_s, sigma, rng):
    """A stage whose calls take median_s * exp(N(0, sigma)) seconds: IQR/median 0.41 at sigma 0.3, more than the
    quick start's baseline showed (0.29)."""
    return lambda: clock.advance(median_s * rng.lognormal(0.0, sigma))


def test_known_distribution_converges_and_its_interval_contains_the_true_ratio(clock):
    # Both stages draw from the same distribution, scaled: the cycle ratio's distribution is symmetric in log
    # around log 3, so the true speed-up (its median) is exactly 3, and the teacher's true median is 6 ms.
    # Ten seeded runs (deterministic): each converges; a 95% interval may miss, but not in most runs.
    holds_ratio = holds_latency = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        timers = {'teacher': lognormal_stub(clock, 0.006, 0.3, rng), 'student': lognormal_stub(clock, 0.002, 0.3, rng)}
        result = measure_interleaved(timers, rounds=30, baseline='teacher', budget_s=60.0, tolerance=0.05)
        student, teacher = result['student'], result['teacher']
        assert student['latency_converged'] is True and student['latency_noisy'] is False
        assert teacher['latency_converged'] is True and student['latency_warning'] is None
        assert 0.95 * student['speedup'] <= student['speedup_ci_low'] <= student['speedup']
        assert student['speedup'] <= student['speedup_ci_high'] <= 1.05 * student['speedup']
        # 30 rounds were not enough (the fixed round count flagged this): it went on in whole cycles, and
        # stopped well before the cap.
        assert student['latency_rounds'] > 30 and student['latency_rounds'] % 2 == 0
        assert student['latency_seconds'] < 20.0
        holds_ratio += student['speedup_ci_low'] <= 3.0 <= student['speedup_ci_high']
        holds_latency += teacher['latency_ms_p50_ci_low'] <= 6.0 <= teacher['latency_ms_p50_ci_high']
    # Over 100 such runs the intervals held the truth in 94 (speed-up) and 92 (latency); these ten: 9 and 7.
    assert holds_ratio >= 8 and holds_latency >= 7, (holds_ratio, holds_latency)


def test_the_interval_is_reproducible_and_shrinks_with_more_cycles():
    rng = np.random.default_rng(0)
    ratios = 3.0 * rng.lognormal(0.0, 0.3, size=4000)
    assert bootstrap_median_interval(ratios[:100], seed=1) == bootstrap_median_interval(ratios[:100], seed=1)
    widths = [np.subtract(*bootstrap_median_interval(ratios[:c])[::-1]) for c in (50, 400, 4000)]
    assert widths[0] > widths[1] > widths[2] > 0
    # Resampling whole cycles: a [cycles, k] matrix of identical rows has a degenerate interval at their median.
    rows = np.tile([1.0, 2.0, 9.0], (20, 1))
    assert bootstrap_median_interval(rows) == (2.0, 2.0)


def test_a_timer_that_never_settles_hits_the_cap_and_is_flagged(clock):
    # The student's speed of a whole cycle is either 1 ms or 9 ms a call, alternately (frequency scaling that
    # flips between two states): half the cycles give a ratio of 6, half of 0.67, and the median over cycles
    # never settles between them.
    calls = {'n': 0}

    def flipping():
        clock.advance(0.001 if (calls['n'] // 2) % 2 == 0 else 0.009)
        calls['n'] += 1

    timers = {'teacher': lambda: clock.advance(0.006), 'student': flipping}
    result = measure_interleaved(timers, rounds=30, warmup=0, baseline='teacher', budget_s=30.0)
    student, teacher = result['student'], result['teacher']
    assert student['latency_converged'] is False and student['latency_noisy'] is True
    assert 'did not converge within the 30 s budget' in student['latency_warning']
    assert '--latency_budget_s' in student['latency_warning']
    assert student['speedup_ci_high'] / student['speedup_ci_low'] > 2
    # It ran to the cap (the next cycle, as long as the longest, 2 x 15 ms, would have ended past it), not beyond.
    assert 30.0 - 0.03 < student['latency_seconds'] <= 30.0
    # The steady teacher converged: only the stage that did not is flagged.
    assert teacher['latency_converged'] is True and teacher['latency_warning'] is None


def test_the_cap_is_respected_and_the_minimum_rounds_are_run_whatever_it(clock):
    one_second = {'a': lambda: clock.advance(1.0), 'b': lambda: clock.advance(1.0)}
    # A round is 2 s, a cycle (2 rounds) 4 s: after 12 s the next cycle would end at 16 s > 13 s: 6 rounds.
    capped = measure_interleaved(one_second, rounds=2, warmup=0, baseline='a', budget_s=13.0)
    assert capped['a']['latency_rounds'] == 6 and capped['a']['latency_seconds'] == 12.0
    # 3 cycles: too few for an interval, so even these constant timers are not called converged.
    assert capped['b']['latency_converged'] is False and f'fewer than the {MIN_CYCLES}' in capped['b']['latency_warning']
    # Warm-up counts against the budget (wall time of the call): 4 s of warm-up leave room for two cycles.
    warmed = measure_interleaved(one_second, rounds=2, warmup=2, baseline='a', budget_s=13.0)
    assert warmed['a']['latency_rounds'] == 4 and warmed['a']['latency_seconds'] == 12.0
    # The minimum is run whatever the budget, and ends on a whole cycle.
    assert measure_interleaved(one_second, rounds=9, warmup=0, budget_s=0.0)['a']['latency_rounds'] == 10
    # Without a budget exactly `rounds` rounds run, a partial last cycle included.
    assert measure_interleaved(one_second, rounds=7, warmup=0)['a']['latency_rounds'] == 7
    # Constant timers with room to spare converge at the first check (MIN_CYCLES cycles) and stop at the
    # confirming one, a cycle later.
    settled = measure_interleaved(one_second, rounds=2, warmup=0, baseline='a', budget_s=100.0)
    assert settled['a']['latency_rounds'] == 2 * (MIN_CYCLES + 1) and settled['b']['latency_converged'] is True


def test_the_cap_holds_on_the_real_clock():
    """Sleeping stubs that never settle (a random 1 or 4 ms a call): the call returns within the budget plus
    at most one cycle's overrun."""
    rng = np.random.default_rng(3)
    timers = {'a': lambda: time.sleep(0.002), 'b': lambda: time.sleep(0.001 if rng.random() < 0.5 else 0.004)}
    started = time.perf_counter()
    result = measure_interleaved(timers, rounds=2, warmup=0, baseline='a', budget_s=0.5, tolerance=0.001)
    took = time.perf_counter() - started
    # (whether real sleeps settle depends on the machine; the fake-clock tests pin the flag down)
    assert result['b']['latency_seconds'] <= took < 0.5 + 0.25


def test_bad_budget_and_tolerance_are_usage_errors():
    from research_errors import UsageError
    with pytest.raises(UsageError, match='budget_s'):
        measure_interleaved({'a': lambda: None}, rounds=3, budget_s=-1.0)
    with pytest.raises(UsageError, match='tolerance'):
        measure_interleaved({'a': lambda: None}, rounds=3, tolerance=0.0)
