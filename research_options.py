"""A small typed layer for command-line settings: a dataclass field declares a flag (help, choices, range),
and the parser, the `--help` text and the check of every value are built from those declarations.

Standard library only. `research_settings` declares the tool's groups with it. Conventions: a field `name`
is the flag `--name`; a boolean that defaults to False is a switch, one that defaults to True has an off
switch (`--no_name`, or `off_flag`) and, with `on_flag`, `--name` too; a tuple field takes comma-separated
items (`--seeds 42,43,44`); every float must be finite; `low`/`high` bound a number.
"""

import argparse
import dataclasses
import math
import typing
from dataclasses import field
from typing import Dict, List, Optional, Sequence, Tuple


def setting(default, help: str, *, choices: Sequence = (), low=None, high=None, low_open: bool = False,
            high_open: bool = False, on_flag: bool = False, off_flag: Optional[str] = None, result: bool = True,
            metavar: Optional[str] = None):
    """A field with its command-line metadata. `low`/`high` bound a number (`*_open`: the bound itself is out);
    every float must also be finite. A boolean that defaults to True is turned off by `off_flag` (default
    `--no_<name>`), and also has `--<name>` with `on_flag`. `result=False`: the setting cannot change what a
    stage produces. A list default is a tuple (fields are immutable); the command line takes comma-separated
    items."""
    metadata = {'help': help, 'choices': tuple(choices), 'low': low, 'high': high, 'low_open': low_open,
                'high_open': high_open, 'on_flag': on_flag, 'off_flag': off_flag, 'result': result, 'metavar': metavar}
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata=metadata)


def base_type(annotation):
    """(item type, is a list, may be None) of a field's annotation."""
    optional = typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation)
    if optional:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (tuple, Tuple, list, List):
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ','.join(str(v) for v in value) or '(none)'
    return str(value)


def range_text(meta: Dict) -> str:
    """`[0, 1)`-style text of a field's bounds, '' when unbounded."""
    low, high = meta['low'], meta['high']
    if low is None and high is None:
        return ''
    if high is None:
        return f'{">" if meta["low_open"] else ">="} {low:g}'
    if low is None:
        return f'{"<" if meta["high_open"] else "<="} {high:g}'
    return f'{"(" if meta["low_open"] else "["}{low:g}, {high:g}{")" if meta["high_open"] else "]"}'


def _item_parser(item_type, flag: str):
    def parse(text: str):
        try:
            return item_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{flag} takes {item_type.__name__} values, got {text!r}')
    return parse


def _comma_list_parser(item_type, flag: str):
    item = _item_parser(item_type, flag)

    def parse(text: str):
        return tuple(item(part.strip()) for part in text.split(',') if part.strip())
    return parse


def _add_field(group, f) -> None:
    meta, flag = f.metadata, '--' + f.name
    item_type, is_list, _ = base_type(f.type)
    if item_type is bool:
        if f.default:
            if meta['on_flag']:
                group.add_argument(flag, action='store_true', dest=f.name, default=True,
                                   help=f'On unless {meta["off_flag"] or "--no_" + f.name} (the default).')
            group.add_argument(meta['off_flag'] or '--no_' + f.name, action='store_false', dest=f.name, help=meta['help'])
        else:
            group.add_argument(flag, action='store_true', default=False, help=meta['help'])
        return
    bounds = range_text(meta)
    help_text = meta['help'] + (f' Range: {bounds}.' if bounds else '') + f' (default: {_show(f.default)})'
    kwargs = {'default': f.default, 'help': help_text, 'metavar': meta['metavar']}
    if is_list:   # choices of a list's items are checked with the ranges (argparse would compare the whole list)
        kwargs['type'] = _comma_list_parser(item_type, flag)
    else:
        kwargs['type'] = item_type            # argparse's own message: "invalid int value: 'abc'"
        if meta['choices']:
            kwargs['choices'] = meta['choices']
    group.add_argument(flag, **kwargs)


def add_group_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --help section (the dataclass's docstring) with a flag per field."""
    group = parser.add_argument_group(cls.__doc__.strip())
    for f in dataclasses.fields(cls):
        _add_field(group, f)


def declaration_problems(group) -> List[str]:
    """One message per field of a group instance whose value is outside its declaration."""
    problems = []
    for f in dataclasses.fields(group):
        item_type, is_list, _ = base_type(f.type)
        values = getattr(group, f.name)
        for value in (values or ()) if is_list else (values,):
            if is_list and f.metadata['choices'] and value not in f.metadata['choices']:
                problems.append(f"--{f.name}: unknown value '{value}'. Choose from: {', '.join(f.metadata['choices'])}.")
            problem = _bound_problem(value, f.metadata) if item_type in (int, float) and value is not None else None
            if problem:
                problems.append(f'--{f.name} must be {problem}, got {value}.')
    return problems


def _bound_problem(value, meta: Dict) -> Optional[str]:
    bounds = range_text(meta)
    if isinstance(value, float) and not math.isfinite(value):
        return 'a finite number' + (f' in {bounds}' if bounds else '')
    low, high = meta['low'], meta['high']
    too_low = low is not None and (value <= low if meta['low_open'] else value < low)
    too_high = high is not None and (value >= high if meta['high_open'] else value > high)
    if not (too_low or too_high):
        return None
    if high is not None and low is not None:
        return f'in {bounds}'
    if high is not None:
        return bounds
    if meta['low_open']:
        return 'positive' if low == 0 else f'more than {low:g}'
    return '0 or more' if low == 0 and not isinstance(value, int) else f'at least {low:g}'
