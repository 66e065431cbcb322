"""The search space of a budgeted search (--search): which of the tool's own settings a trial may change, the
default space, the --search_space file (YAML or JSON) that replaces it, and turning one trial's choices into
the settings of the pipeline it runs.

A space maps a setting to a list of choices or to a range:

    kd: [true, false]                      # whether the trial distils a student (likewise prune, quant)
    student_layers: [2, 3]                 # or a range {low: 1, high: 3}
    kd_alpha: {low: 0.3, high: 0.9}        # a float range; {low, high, log: true} samples on a log scale
    quant_method: [dynamic, fp16]

The eight pipelines are the corners of the three technique switches (kd, prune, quant). A setting the space
does not name keeps the command line's value (for kd/prune/quant: whether --pipeline runs that technique).
The command line's value of every setting is always among the choices, so the eight pipelines with the command
line's settings can be the first trials. Everything is checked when the space is read, before any training.

This module never imports optuna: it only calls `trial.suggest_*` on the trial it is given.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import yaml

from research_compression_config import PIPELINE_CONFIGS, pipeline_settings
from research_errors import UsageError
from research_kd import KD_METHODS
from research_models import configured_depth
from research_pruning import PRUNE_METHODS
from research_quantization import QUANT_METHODS, resolve_quant_dtype

TECHNIQUES = ('kd', 'prune', 'quant')


@dataclass(frozen=True)
class SearchSetting:
    """One setting a trial may change: which technique it belongs to (None: any trial with a technique), the
    type of a range over it (None: choices only), and the check of one value (a message when it is wrong)."""
    technique: Optional[str]
    range_type: Optional[type]
    check: Callable[[object], Optional[str]]


def _one_of(names) -> Callable[[object], Optional[str]]:
    return lambda v: None if v in names else f'must be one of {", ".join(names)}'


def _boolean(v) -> Optional[str]:
    return None if isinstance(v, bool) else 'must be true or false'


def _student_layers(v) -> Optional[str]:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return None
    if isinstance(v, str) and all(p.strip().isdigit() for p in v.split(',')) and v.strip():
        return None
    return "must be a number of layers (e.g. 2), a list of teacher layers ('0,2,5'), or null (--student_path)"


def _number(low: float, high: float, low_open: bool = False) -> Callable[[object], Optional[str]]:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v <= high
        return None if ok else f'must be a number in {"(" if low_open else "["}{low:g}, {high:g}]'
    return check


SEARCH_SETTINGS: Dict[str, SearchSetting] = {
    'kd': SearchSetting(None, None, _boolean),
    'prune': SearchSetting(None, None, _boolean),
    'quant': SearchSetting(None, None, _boolean),
    'trim_vocab': SearchSetting(None, None, _boolean),
    'student_layers': SearchSetting('kd', int, _student_layers),
    'kd_method': SearchSetting('kd', None, _one_of(list(KD_METHODS))),
    'kd_alpha': SearchSetting('kd', float, _number(0.0, 1.0)),
    'kd_temperature': SearchSetting('kd', float, _number(0.0, 100.0, low_open=True)),
    'prune_method': SearchSetting('prune', None, _one_of(list(PRUNE_METHODS))),
    'prune_sparsity': SearchSetting('prune', float, _number(0.0, 0.99, low_open=True)),
    'quant_method': SearchSetting('quant', None, _one_of(list(QUANT_METHODS))),
}


def default_space(args) -> Dict[str, object]:
    """The space when no --search_space is given: every technique on or off, derived students of a third,
    half and two thirds of the teacher's depth (when its depth can be read), discrete KD, pruning and
    quantization settings (discrete values let trials share more stored stages than continuous ones)."""
    depth = configured_depth(args.teacher_checkpoint or args.teacher_path)
    layers = sorted({max(1, depth * k // 6) for k in (2, 3, 4)} - {depth}) if depth and depth > 1 else []
    space = {'kd': [True, False], 'prune': [True, False], 'quant': [True, False], 'trim_vocab': [False, True],
             'kd_method': ['logit', 'hidden'], 'kd_alpha': [0.5, 0.7, 0.9], 'kd_temperature': [2.0, 4.0, 8.0],
             'prune_method': ['magnitude', 'structured'], 'prune_sparsity': [0.3, 0.5, 0.7],
             'quant_method': ['dynamic', 'fp16']}
    if layers:
        space['student_layers'] = layers
    return space


def read_space_file(path: str) -> Dict:
    """The mapping a --search_space file holds (YAML, of which JSON is a subset)."""
    try:
        with open(path, encoding='utf-8') as fh:
            text = fh.read()
        space = json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
    except OSError as exc:
        raise UsageError(f"--search_space '{path}' cannot be read ({exc.strerror or exc}). Pass a YAML or JSON file "
                         'that maps settings to choices or ranges (see docs/search.md).')
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"--search_space '{path}' is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f'{str(exc).splitlines()[0]}. Fix the file (see docs/search.md for the format).')
    if not isinstance(space, dict) or not space:
        raise UsageError(f"--search_space '{path}' must hold a mapping of settings to choices or ranges, e.g. "
                         "'kd_alpha: {low: 0.3, high: 0.9}' or 'quant_method: [dynamic, fp16]'.")
    return space


def _range_problem(name: str, spec: Dict) -> Optional[str]:
    setting = SEARCH_SETTINGS[name]
    if setting.range_type is None:
        return 'takes a list of choices, not a range'
    extra = set(spec) - {'low', 'high', 'log'}
    if extra or 'low' not in spec or 'high' not in spec:
        return f'a range needs low and high (and optionally log), got {", ".join(sorted(spec))}'
    for bound in (spec['low'], spec['high']):
        problem = setting.check(bound)
        if problem or (setting.range_type is int and not isinstance(bound, int)):
            return f'bound {bound!r} ' + (problem or 'must be a whole number')
    if not spec['low'] < spec['high']:
        return f'low ({spec["low"]}) must be below high ({spec["high"]})'
    if not isinstance(spec.get('log', False), bool) or (spec.get('log') and spec['low'] <= 0):
        return 'log must be true or false, and a log range needs low > 0'
    return None


def check_space(space: Dict, source: str, teacher_depth: Optional[int]) -> Dict:
    """Refuse an unknown setting or a wrong value (UsageError naming the setting); returns the space with
    student layer counts as the strings --student_layers takes."""
    checked = {}
    for name, spec in space.items():
        if name not in SEARCH_SETTINGS:
            raise UsageError(f"{source}: unknown setting '{name}'. A search can change: {', '.join(SEARCH_SETTINGS)}.")
        if isinstance(spec, dict):
            problem = _range_problem(name, spec)
        elif isinstance(spec, list) and spec:
            problem = next((f'choice {v!r} {p}' for v in spec for p in [SEARCH_SETTINGS[name].check(v)] if p), None)
        else:
            problem = 'must be a non-empty list of choices or a range {low, high[, log]}'
        if problem is None and name == 'student_layers' and teacher_depth:
            counts = [spec['high']] if isinstance(spec, dict) else [v for v in spec if isinstance(v, int)]
            if any(c >= teacher_depth for c in counts):
                problem = f'keeps as many layers as the teacher has ({teacher_depth}) or more'
        if problem:
            raise UsageError(f"{source}: '{name}' {problem}. Fix it (see docs/search.md for the format).")
        checked[name] = [str(v) if isinstance(v, int) and name == 'student_layers' else v for v in spec] \
            if isinstance(spec, list) else dict(spec)
    return checked


def command_line_values(args) -> Dict[str, object]:
    """The command line's value of every search setting (the techniques: whether --pipeline runs them)."""
    values = {name: getattr(args, name) for name in SEARCH_SETTINGS if name not in TECHNIQUES}
    chain = PIPELINE_CONFIGS[args.pipeline].chain
    values.update({t: t in chain for t in TECHNIQUES})
    return values


def load_space(args) -> Dict:
    """The checked search space of this run (--search_space, else the default), with the command line's
    value among the choices of every setting it names."""
    depth = configured_depth(args.teacher_checkpoint or args.teacher_path)
    source = f"--search_space '{args.search_space}'" if args.search_space else 'the default search space'
    raw = read_space_file(args.search_space) if args.search_space else default_space(args)
    space = check_space(raw, source, depth)
    for name, value in command_line_values(args).items():
        if name in space and isinstance(space[name], list) and value not in space[name]:
            space[name].append(value)
    return space


# ---------------------------------------------------------------------------------------------
# One trial: its choices, its pipeline, its settings
# ---------------------------------------------------------------------------------------------

def suggest(trial, name: str, spec) -> object:
    """A value of one setting for `trial` (optuna's define-by-run API)."""
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if SEARCH_SETTINGS[name].range_type is int:
        return str(trial.suggest_int(name, spec['low'], spec['high'], log=spec.get('log', False)))
    return trial.suggest_float(name, spec['low'], spec['high'], log=spec.get('log', False))


def choose(trial, space: Dict, args) -> Dict[str, object]:
    """The trial's settings: the techniques first, then only the settings of the techniques it runs (a
    setting of a technique that does not run is not sampled, so it cannot make a trial look different)."""
    fixed = command_line_values(args)
    chosen = {t: suggest(trial, t, space[t]) if t in space else fixed[t] for t in TECHNIQUES}
    for name, setting in SEARCH_SETTINGS.items():
        if name in TECHNIQUES:
            continue
        runs = chosen[setting.technique] if setting.technique else any(chosen[t] for t in TECHNIQUES)
        if runs:
            chosen[name] = suggest(trial, name, space[name]) if name in space else fixed[name]
    return chosen


def pipeline_of(chosen: Dict[str, object]) -> str:
    """The pipeline whose stages are the techniques the trial runs."""
    stages = tuple(t for t in TECHNIQUES if chosen[t])
    return next(name for name, p in PIPELINE_CONFIGS.items() if p.stages == stages)


def trial_settings(args, chosen: Dict[str, object]):
    """The settings the trial's pipeline runs with: the command line's, with the trial's choices."""
    settings = pipeline_settings(args.replace(**{n: v for n, v in chosen.items() if n not in TECHNIQUES}),
                                 pipeline_of(chosen), args.train_seeds[0])
    if settings.quant_method != args.quant_method:   # the method's own storage type, not the command line's
        settings = settings.replace(quant_dtype=None, quant_dtype_resolved=resolve_quant_dtype(settings.quant_method, None))
    return settings


def corner_choices(args, pipeline: str) -> Dict[str, object]:
    """The trial that runs `pipeline` with the command line's settings (one of the eight enqueued first)."""
    chain = PIPELINE_CONFIGS[pipeline].chain
    chosen = {t: t in chain for t in TECHNIQUES}
    values = command_line_values(args)
    for name, setting in SEARCH_SETTINGS.items():
        if name not in TECHNIQUES and (chosen[setting.technique] if setting.technique else len(chain) > 1):
            chosen[name] = values[name]
    return chosen


# How each setting orders from most to least compressed (a lower rank is smaller and faster); the settings not
# named here (the KD loss's method, alpha, temperature) change quality, not size or speed.
# Quantization: int8 dynamic was the fastest on the CPU in BENCHMARKS.md, int4 the smallest but half as fast.
QUANT_PREFERENCE = ('dynamic', 'static', 'qat', 'int4', 'fp16')


def _layer_count(value) -> float:
    """Layers of a --student_layers value: '2' keeps two, '0,2,5' three; None (--student_path) ranks last."""
    if value is None:
        return float('inf')
    parts = str(value).split(',')
    return len(parts) if len(parts) > 1 else int(parts[0])


COMPRESSION_RANK: Dict[str, Callable[[object], float]] = {
    'kd': lambda v: not v, 'prune': lambda v: not v, 'quant': lambda v: not v, 'trim_vocab': lambda v: not v,
    'student_layers': _layer_count,
    'prune_method': lambda v: v != 'structured',            # the one method that makes the matrices smaller
    'prune_sparsity': lambda v: -v,
    'quant_method': lambda v: QUANT_PREFERENCE.index(v) if v in QUANT_PREFERENCE else len(QUANT_PREFERENCE),
}


def _most_compressed_value(name: str, spec) -> object:
    if isinstance(spec, dict):   # a range: its smaller bound for a layer count, its larger one for a sparsity
        return spec['low'] if name == 'student_layers' else spec['high']
    return min(spec, key=COMPRESSION_RANK[name])


def most_compressed_choices(space: Dict, args) -> Dict[str, object]:
    """The space's most compressed trial: every technique it allows, the fewest student layers, a trimmed
    vocabulary, structured pruning at the highest sparsity, int8; the KD loss keeps the command line's settings.
    Enqueued after the eight pipelines: it says early whether the budget is within reach of the space at all,
    and gives the sampler a point in the small, fast corner that random sampling rarely hits (about 1 trial in
    100 of the default space)."""
    fixed = command_line_values(args)
    chosen = {t: _most_compressed_value(t, space[t]) if t in space else fixed[t] for t in TECHNIQUES}
    for name, setting in SEARCH_SETTINGS.items():
        runs = chosen[setting.technique] if setting.technique else any(chosen[t] for t in TECHNIQUES)
        if name in TECHNIQUES or not runs:
            continue
        chosen[name] = (_most_compressed_value(name, space[name]) if name in space and name in COMPRESSION_RANK
                        else fixed[name])
    return chosen


def describe(chosen: Dict[str, object], settings) -> str:
    """The trial in a few words: `kd(L2, logit a0.7 T4, trim) → structured 60 % → int8`."""
    parts = []
    trim = ', trim' if chosen.get('trim_vocab') else ''
    if chosen['kd']:
        student = f'L{settings.student_layers}' if settings.student_layers else os.path.basename(str(settings.student_path))
        parts.append(f'kd({student}, {settings.kd_method} a{settings.kd_alpha:g} T{settings.kd_temperature:g}{trim})')
        trim = ''
    if chosen['prune']:
        parts.append(f'{settings.prune_method} {settings.prune_sparsity:.0%}'.replace('%', ' %') + (trim and ' (trim)'))
        trim = ''
    if chosen['quant']:
        method = settings.quant_method
        parts.append(('int8' if method == 'dynamic' else f'int8 {method}' if method in ('static', 'qat')
                      else settings.quant_dtype_resolved) + (trim and ' (trim)'))
    return ' → '.join(parts) or 'teacher'


def space_lines(space: Dict) -> List[str]:
    """The space, one setting a line (for the configuration print)."""
    return [f'  {name:<15} ' + (f'[{spec["low"]}, {spec["high"]}]' + (' log' if spec.get('log') else '')
                                if isinstance(spec, dict) else ', '.join(map(str, spec))) for name, spec in space.items()]
