"""Configuration files for the daemons: YAML whose keys are the command-line flags.

``tidegate ingress --config /etc/tidegate/ingress.yaml`` (and ``tidegate scaler --config``)
read one YAML mapping, so a systemd unit's command line stays short and the settings live in
/etc/tidegate. The keys come from the subcommand's argparse parser, so every flag has a key
and a new flag gets one without a list to keep in step:

- a key is a long flag without its dashes (``tls-listen``; ``tls_listen`` is accepted too),
  or a positional argument's name (``paths`` for ``tidegate scaler PATH...``);
- a flag that takes a value takes a string or a number (``keepalive-timeout: 60s``,
  ``queue-max: 1000``), converted and checked as on the command line;
- a repeatable flag takes a list (``listen: [":80", ":8080"]``; one value is a list of one);
- an on/off flag takes ``true`` or ``false`` (``no-access-log: true``);
- ``null`` leaves the flag at its default.

The command line wins: a flag given there replaces the file's value, for a repeatable flag
too (its list is not appended to the file's). ``config`` is not a key. An unknown key or a
value of the wrong type is a :class:`ConfigError` naming the file and the key, with the
closest key suggested; YAML's ``off``/``no``/``yes`` read as booleans, so a string value that
looks like one must be quoted, and the error says so.

Knowing which flags the command line gave needs help from the parser: argparse fills in
defaults, so ``--metrics-listen 127.0.0.1:9464`` and no flag at all look the same afterwards.
:func:`add_config_flag` therefore makes each of the parser's actions note its destination
when the command line uses it.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "add_config_flag", "apply_config", "config_keys", "load_config"]

# Namespace attributes (private to this module): the parser, so apply_config() can find its
# actions, and the destinations the command line gave.
_PARSER = "_config_parser"
_EXPLICIT = "_config_explicit"
# Not settable from a file: --help does not configure anything, and --config names the file.
_EXCLUDED = frozenset({"help", "config"})


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")


def add_config_flag(parser: argparse.ArgumentParser, *, example: str) -> None:
    """Add ``--config FILE`` to a daemon's parser; call it after the other flags.

    It also marks each action so that a parse records the flags the command line gave,
    which :func:`apply_config` keeps over the file's values."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"read flags from this YAML file (e.g. {example}): its keys are the long "
        "flags without their dashes; flags given on the command line win",
    )
    for action in parser._actions:
        if action.dest not in _EXCLUDED and action.dest != argparse.SUPPRESS:
            action.__class__ = _recording(type(action))
    parser.set_defaults(**{_PARSER: parser})


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the values of the ``--config`` file where the command line
    gave none; ``args`` itself is left as parsed, so a reload can apply the file again.
    Without ``--config``, ``args``. :class:`ConfigError` for a bad file."""
    path = getattr(args, "config", None)
    parser = getattr(args, _PARSER, None)
    if path is None or parser is None:
        return args
    given: set[str] = getattr(args, _EXPLICIT, set())
    merged = argparse.Namespace(**vars(args))
    for dest, value in load_config(path, parser).items():
        if dest not in given:
            setattr(merged, dest, value)
    return merged


def config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a configuration file for this parser may use (dashed spelling) and the
    action it sets: each long flag without its dashes, and each positional's name."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _EXCLUDED or action.dest == argparse.SUPPRESS:
            continue
        if action.option_strings:
            for option in action.option_strings:
                if option.startswith("--"):
                    keys[option[2:]] = action
        else:
            keys[action.dest.replace("_", "-")] = action
    return keys


def load_config(path: str | os.PathLike[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The values a configuration file gives, by argparse destination, converted and checked
    as the command line's are. :class:`ConfigError` for anything wrong with the file."""
    source = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    data = _load_mapping(text, source)
    keys = config_keys(parser)
    values: dict[str, Any] = {}
    first_key: dict[str, str] = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(source, str(raw_key), "keys must be strings (flag names)")
        key = raw_key.replace("_", "-")
        if key.startswith("-"):
            raise ConfigError(source, raw_key, f"write the flag without dashes: {key.lstrip('-')}")
        if key == "config":
            raise ConfigError(source, raw_key, "a configuration file cannot name another one")
        action = keys.get(key)
        if action is None:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            reason = f"unknown key{hint}; the keys are the flags of `{parser.prog} --help`"
            raise ConfigError(source, raw_key, reason)
        if action.dest in first_key:
            raise ConfigError(source, raw_key, f"given twice (also as {first_key[action.dest]!r})")
        first_key[action.dest] = raw_key
        if value is None:  # null: the flag's default, which the parse already set
            continue
        values[action.dest] = _convert(action, value, source, raw_key)
    return values


def _load_mapping(text: str, source: str) -> dict[Any, Any]:
    """The file's one YAML mapping (an empty file is an empty one). A key given twice is an
    error, not last-one-wins: two values for one flag is a mistake worth reporting."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(source, "", "expected a mapping of flag names to values")
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise ConfigError(source, key_node.value, "given twice")
                seen.add(key_node.value)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    assert isinstance(data, dict)
    return data


def _convert(action: argparse.Action, value: object, source: str, key: str) -> Any:
    """``value`` as the action would store it, had the command line given it."""
    if isinstance(action, argparse._StoreConstAction | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false (got {_describe(value)})")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(source, key, f"must be a count >= 0 (got {_describe(value)})")
        return value
    if isinstance(action, argparse._AppendAction):  # --flag X, repeatable (extend too)
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, source, f"{key}[{i}]") for i, item in enumerate(items)]
    if isinstance(action, argparse._StoreAction):
        if action.nargs in (None, argparse.OPTIONAL):
            return _scalar(action, value, source, key)
        items = value if isinstance(value, list) else [value]
        if action.nargs == argparse.ONE_OR_MORE and not items:
            raise ConfigError(source, key, "needs at least one value")
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ConfigError(source, key, f"needs {action.nargs} values (got {len(items)})")
        return [_scalar(action, item, source, f"{key}[{i}]") for i, item in enumerate(items)]
    raise ConfigError(source, key, "cannot be set in a configuration file")


def _scalar(action: argparse.Action, value: object, source: str, key: str) -> Any:
    """One value as the command line would give it: its text through the flag's type and
    choices. Strings and numbers only; a boolean is almost always an unquoted off/yes/no."""
    if isinstance(value, bool):
        word = "true" if value else "false"
        raise ConfigError(
            source,
            key,
            f"must be a string or a number (got {word}; quote it: YAML reads "
            "off/on/yes/no as booleans)",
        )
    if not isinstance(value, str | int | float):
        raise ConfigError(source, key, f"must be a string or a number (got {_describe(value)})")
    text = str(value)
    converted: Any = text
    convert = action.type
    if callable(convert):
        try:
            converted = convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            if convert is int or convert is float:  # their messages name Python, not the key
                kind = "an integer" if convert is int else "a number"
                reason = f"must be {kind} (got {text!r})"
            else:
                reason = str(exc) or f"invalid value {text!r}"
            raise ConfigError(source, key, reason) from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(source, key, f"must be one of {allowed} (got {text!r})")
    return converted


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_Call = Callable[..., None]
_RECORDING: dict[type[argparse.Action], type[argparse.Action]] = {}


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    """A subclass of an action class whose calls note the destination in the namespace: an
    action is called only for what the command line gives (defaults are set directly). An
    optional positional that got no word (``nargs="*"``) is called with ``[]``: not given."""
    if base in _RECORDING.values():
        return base
    if base not in _RECORDING:
        call: _Call = base.__call__

        def __call__(
            self: argparse.Action,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Any,
            option_string: str | None = None,
        ) -> None:
            call(self, parser, namespace, values, option_string)
            if self.option_strings or values not in (None, []):
                vars(namespace).setdefault(_EXPLICIT, set()).add(self.dest)

        _RECORDING[base] = type(f"Recording{base.__name__}", (base,), {"__call__": __call__})
    return _RECORDING[base]
