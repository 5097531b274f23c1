"""Options as a table named like the command line: written into reports, read by --config.

A report's ``options`` holds every option of the run keyed by its long flag without dashes
(``ratio``, ``keep-bn``, ``layer-ratio``, ``min-cosine``); ``compress --config`` reads such a
table back (from a JSON report, a JSON object or a TOML file), so a run can be repeated.
Paths of the run itself (the model, ``-o``, ``--report``, ``--config``) are not options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ModelError, UsageError

NOT_OPTIONS = {"help", "version", "output", "report", "config", "debug", "verbose", "command_parser"}


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name without dashes -> its action, for the options worth recording."""
    actions = {}
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in NOT_OPTIONS:
            actions[longs[0][2:]] = action
    return actions


def _to_text(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):  # GLOB=R
        return f"{value[0]}={value[1]}"
    if isinstance(value, list):
        return [_to_text(v) for v in value]
    return value


def options_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The run's options, keyed as on the command line."""
    return {name: _to_text(getattr(args, action.dest, None)) for name, action in _flag_actions(parser).items()}


def _convert(name: str, action: argparse.Action, value, source: str):
    def one(v):
        if action.type is not None and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                v = action.type(str(v))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{source}: {name} = {v!r}: {exc}") from None
        if action.choices is not None and v not in action.choices:
            raise UsageError(f"{source}: {name} = {v!r}; choose from {', '.join(map(str, action.choices))}")
        return v

    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {name} takes true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, (list, dict)):
        raise UsageError(f"{source}: {name} takes one value, got {value!r}")
    return one(value)


def read_table(path: str | Path) -> dict:
    """The options table of a JSON or TOML file (a report: its 'options' section)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    text = path.read_text(errors="replace")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            table = tomllib.loads(text)
        else:
            table = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{path}: not a valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} file "
                         f"({str(exc)[:200]})") from None
    if isinstance(table, dict) and "schema_version" in table and isinstance(table.get("options"), dict):
        table = table["options"]
    if not isinstance(table, dict):
        raise ModelError(f"{path}: expected a table of options")
    return table


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """dest -> value for ``parser.set_defaults``: flags given on the command line still win."""
    actions = _flag_actions(parser)
    defaults = {}
    for key, value in read_table(path).items():
        name = key.replace("_", "-")
        if name not in actions:
            raise UsageError(f"{path}: unknown option {key!r} for {parser.prog}")
        defaults[actions[name].dest] = _convert(name, actions[name], value, str(path))
    return defaults
