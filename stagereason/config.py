"""One config mechanism for every verb: dataclasses filled from a YAML file plus flag overrides.

Built on TRL's ``TrlParser`` (itself ``transformers.HfArgumentParser``), so a
verb can reuse TRL's ``SFTConfig`` and every TRL field works. Flags are
accepted as ``--beam_size`` and ``--beam-size``; YAML keys likewise. Unknown
keys and flags are errors that name the key (and the file) and suggest the
closest known name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "did_you_mean", "parse_config", "load_yaml_config", "make_parser"]


class ConfigError(ValueError):
    """A bad config file, key, flag or value; the message names it."""


# training options that transformers 5 / TRL 1 renamed or removed, and what to write instead
RENAMED = {
    "group_by_length": "--train_sampling_strategy group_by_length",
    "evaluation_strategy": "--eval_strategy",
    "no_cuda": "--use_cpu",
    "per_gpu_train_batch_size": "--per_device_train_batch_size",
    "per_gpu_eval_batch_size": "--per_device_eval_batch_size",
    "max_seq_length": "--max_length",
    "include_inputs_for_metrics": "--include_for_metrics inputs",
}


def did_you_mean(name: str, known: list[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a mistyped ``name``, or ``""`` if none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(name: str, known: list[str]) -> str:
    bare = name.lstrip("-")
    if bare in RENAMED:
        return f" (transformers 5 / TRL 1 replaced it: use {RENAMED[bare]})"
    # a name of the same family first (--lora_rank: --lora_r, not --local_rank)
    head = bare.split("_")[0]
    family = [k for k in known if k.lstrip("-").split("_")[0] == head]
    return (did_you_mean(name, family, cutoff=0.5) if family else "") or did_you_mean(name, known)


def make_parser(types: tuple[type, ...], prog: str, description: str, positionals: tuple[str, ...] = ()):
    """A ``TrlParser`` for ``types`` with ``--config FILE`` and no abbreviated flags."""
    from trl import TrlParser

    usage = None
    if positionals:
        names = " ".join(p.upper() for p in positionals)
        usage = f"{prog} {names} [options]   ({names} may also be given as --{' --'.join(positionals)})"
    parser = TrlParser(types, prog=prog, description=description, usage=usage, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    for action in parser._actions:  # HfArgumentParser gives --no_X the help of --X, which reads backwards
        flag = next((o for o in action.option_strings if o.startswith("--no_")), None)
        if flag is not None:
            action.help = f"Turn off --{flag[len('--no_'):]}."
        if getattr(action.type, "__name__", "") == "string_to_bool" and action.nargs is None:
            # a `bool | None` option (default: decided later, e.g. --bf16) needs a value there; a bare flag means
            # true, as it does for the plain booleans
            action.nargs, action.const = "?", True
    return parser


def _field_names(types: tuple[type, ...]) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t) if f.init]


def load_yaml_config(path: str | Path, types: tuple[type, ...]) -> dict[str, Any]:
    """Read a YAML mapping of options, normalising ``beam-size`` to ``beam_size``.

    Raises:
        ConfigError: a missing or unparsable file, a non-mapping, or an unknown key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    known = _field_names(types)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown key {key!r} in {path}{_suggest(name, known)}")
        out[name] = value
    return out


def _expand_positionals(argv: list[str], positionals: tuple[str, ...]) -> list[str]:
    """Turn leading bare arguments into ``--name value`` for the verb's positional fields."""
    out, rest, i = [], list(argv), 0
    while rest and i < len(positionals) and not rest[0].startswith("-"):
        out += [f"--{positionals[i]}", rest.pop(0)]
        i += 1
    return out + rest


def parse_config(types: tuple[type, ...], argv: list[str], *, prog: str = "stagereason",
                 description: str = "", positionals: tuple[str, ...] = ()) -> tuple:
    """Parse ``argv`` (``--config FILE`` plus flags) into one instance of each dataclass in ``types``.

    Args:
        types: the verb's config dataclasses.
        argv: the arguments after the verb.
        prog: program name for usage and errors.
        description: the verb's ``--help`` text.
        positionals: fields that may also be given as leading bare arguments.

    Returns:
        A tuple with one instance per type.

    Raises:
        ConfigError: unknown flag or key, bad YAML, or a value the dataclass rejects.
        SystemExit: ``--help``, or a missing required option / bad value (argparse prints why).
    """
    parser = make_parser(types, prog, description, positionals)
    args = _expand_positionals(list(argv), positionals)
    pre, _ = _pre_parser().parse_known_args(args)
    if pre.config and len(pre.config) > 1:
        raise ConfigError(f"{prog}: --config given {len(pre.config)} times ({', '.join(pre.config)}); give one "
                          "file and override its options with flags")
    pre.config = pre.config[0] if pre.config else None
    if pre.config:
        defaults = _check_yaml_values(parser, load_yaml_config(pre.config, types), pre.config)
        parser.set_defaults_with_config(**defaults)
    # unknown flags first: the dataclasses' own checks would otherwise complain about what a misspelt flag left out
    _, remaining = parser.parse_known_args(args=args)
    if remaining:
        flags = [a for a in remaining if a.startswith("-")] or remaining
        known = [o for a in parser._actions for o in a.option_strings]
        bad = flags[0].split("=")[0]
        what = "unknown option" if bad.startswith("-") else "unexpected argument"
        raise ConfigError(f"{prog}: {what} {bad}{_suggest(bad, known)}; see {prog} --help")
    try:
        *objs, _ = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prog}: {err}") from err
    return tuple(o for o in objs if not isinstance(o, argparse.Namespace))  # drop the --config namespace


def _check_yaml_values(parser, values: dict[str, Any], path: str) -> dict[str, Any]:
    """Convert and check YAML values as their flags would be: argparse never checks a default it is given.

    Without this, ``peft: foo`` or ``lora_r: 8.5`` in a YAML file would pass silently and
    ``learning_rate: [1, 2]`` would fail deep in the optimizer.
    """
    actions = {a.dest: a for a in parser._actions}
    out = dict(values)
    for key, value in values.items():
        action = actions.get(key)
        if action is None or value is None or action.type in (None, str):
            continue
        items = value if action.nargs in ("+", "*") and isinstance(value, list) else [value]
        converted = []
        for item in items:
            what = f"{key}: {item!r} in {path}"
            if isinstance(item, (list, dict)):
                raise ConfigError(f"{what} must be a single value, not a {type(item).__name__}")
            try:
                got = action.type(item if isinstance(item, str) else str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"{what} is not a valid value ({err})") from err
            if action.choices is not None and got not in action.choices:
                raise ConfigError(f"{what} is not one of {', '.join(map(str, action.choices))}")
            converted.append(got)
        out[key] = converted if items is value else converted[0]
    return out


def _pre_parser():
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append")
    return pre


def dump_config(objs: tuple, path: str | Path, paths: tuple[str, ...] = ()) -> None:
    """Write the resolved config of a run as YAML (one mapping, every field); the options named in ``paths`` that
    name a local file or folder are written as absolute paths, so that the file reloads from anywhere."""
    from stagereason.fsio import local_or_name

    merged: dict[str, Any] = {}
    for obj in objs:
        d = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        # transformers' to_dict hides *_token values behind "<NAME>" placeholders; written back they would be read
        # as real tokens, so they are left out (a hub token is a secret anyway)
        merged.update({k: v for k, v in d.items() if not (k.endswith("_token") and v == f"<{k.upper()}>")})
    for name in paths:
        if isinstance(merged.get(name), str):
            merged[name] = local_or_name(merged[name])

    class _NoAliases(yaml.SafeDumper):  # equal dicts written out in full, not as &id001 / *id001
        def ignore_aliases(self, data):
            return True

    Path(path).write_text(yaml.dump(merged, Dumper=_NoAliases, sort_keys=False))
