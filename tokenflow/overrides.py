"""The command line's `key=value` overrides, read as typed and checked against config.py before Hydra.

Two changes to Hydra's reading:
- `prompt=`, `negative_prompt=` and `inversion_prompt=` take their value as literal text: commas,
  quotes, apostrophes, backslashes, `${...}`, unicode and emoji reach the model as typed (Hydra's
  grammar would read a comma as a sweep or a list). `<key>_file=PATH` reads the text from a file.
- every key at every depth, with or without `+`, and every group option is checked against the
  schema: an unknown one is one line naming the nearest known name, instead of Hydra's traceback
  or, worse, its advice to add the key with `+`, which would run the default silently.
Values are checked for their type here (`steps=abc`); ranges are checked by config.py once the
config is composed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path

from .config import METHODS, ConfigError, RunConfig, section_classes
from .hydra_config import GROUPS, group_options

TEXT_KEYS = ("prompt", "negative_prompt", "inversion_prompt")  # values taken literally
FILE_SUFFIX = "_file"  # prompt_file=PATH: the prompt is the file's text
# key=value, +key=value, ++key=value, ~key[=value] (Hydra's override forms); the value may hold anything
OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-]*)(?P<package>@[\w.\-]*)?=(?P<value>.*)$", re.S)


class UsageError(ConfigError):
    """A command-line problem found before Hydra runs."""


def hydra_string(text: str) -> str:
    """`text` as a quoted Hydra override value that composes back to exactly `text`.

    Two layers read it: Hydra's override grammar (in a quoted string a backslash is literal except
    before the closing quote or an escaped quote, where backslashes come doubled) and OmegaConf,
    which would resolve `${...}` (escaped as `\\${`, with the backslashes before it doubled)."""
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return "'" + text + "'"


def read_text_file(key: str, path: str) -> str:
    """The text of `<key>_file=path` (UTF-8, trailing whitespace dropped)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: cannot read it ({e.strerror})") from None
    text = text.rstrip()
    if not text:
        raise UsageError(f"{key}{FILE_SUFFIX}={path}: the file is empty")
    return text


def nearest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(what: str, word: str, choices, prefix: str = "") -> UsageError:
    near = nearest(word, choices)
    hint = f"did you mean {prefix}{near}?" if near else f"known: {', '.join(sorted(choices))}"
    return UsageError(f"unknown {what} ({hint})")


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_types(methods: list[str]) -> dict[str, dict[str, dict]]:
    """Top-level key -> {sub-key: type} of every section; `method` joins the fields of the methods chosen."""
    top = _fields(RunConfig)
    sections = {k: _fields(t) for k, t in section_classes().items()}
    sections["method"] = {k: v for m in methods for k, v in _fields(METHODS[m]).items()}
    return top, sections


def _check_type(key: str, value, kind) -> None:
    """A value Hydra parsed (int, float, bool, str, None, list) against the field's type."""
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if value is None:
            return
    if kind is typing.Any or kind is str or (isinstance(value, str) and "${" in value):
        return  # an interpolation (device=cuda:${mod:${hydra:job.num},4}) is checked once resolved, by config.py
    if value is None:
        raise UsageError(f"{key}=null: {key} cannot be null")
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool)}.get(kind)
    if typing.get_origin(kind) is list:
        ok = isinstance(value, list)
    if ok is False:
        name = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a list")
        raise UsageError(f"{key}={value}: {key} must be {name}")


def _values(override) -> list:
    """The value of a parsed override, or each value of a sweep."""
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def _searchpath_experiments(parsed) -> list[str]:
    """Experiments of the folders a `hydra.searchpath=[file://DIR]` override adds (DIR/experiment/*.yaml)."""
    names = []
    for o in parsed:
        if o.key_or_group == "hydra.searchpath":
            for entry in o.value() or []:
                if str(entry).startswith("file://"):
                    names += sorted(p.stem for p in (Path(str(entry)[len("file://"):]) / "experiment").glob("*.yaml"))
    return names


def check(args: list[str]) -> None:
    """Refuse an override of a key, group option or value the schema does not have, in one line.
    `args`: the command line as Hydra will read it (after `prepare`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except (OverrideParseException, HydraException) as e:
            raise UsageError(f"cannot read the override {arg!r}: {str(e).strip().splitlines()[0]}") from None
    chosen_methods = ["pnp"]
    extra = _searchpath_experiments(parsed)
    for o in parsed:  # group options first: a method's keys depend on which method is chosen
        group = o.key_or_group
        if group in GROUPS:
            options = group_options(group) + (extra if group == "experiment" else [])
            for v in _values(o):
                if v is None and group == "experiment":
                    continue
                if str(v) not in options:
                    near = nearest(str(v), options)
                    hint = f"did you mean {near}? " if near else ""
                    raise UsageError(f"unknown {group} {v} ({hint}choose one of {', '.join(options)})")
            if group == "method":
                chosen_methods = [str(v) for v in _values(o)]
    top, sections = _section_types(chosen_methods)
    for o in parsed:
        key = o.key_or_group
        if key in GROUPS or key.split(".")[0] == "hydra" or "/" in key:
            continue
        plus = "+" if o.is_add() else ("++" if o.is_force_add() else "")
        if o.is_delete():
            raise UsageError(f"~{key}: settings cannot be deleted; give {key}=VALUE instead")
        head, _, rest = key.partition(".")
        if head not in top:
            raise _unknown(f"key {plus}{key}", head, top)
        kind = top[head]
        if rest:
            if head not in sections:
                raise UsageError(f"unknown key {plus}{key} ({head} is a single value, not a section)")
            sub, _, deeper = rest.partition(".")
            if sub not in sections[head]:
                if head == "method":  # a key of another method, or a typo of one: name the method it belongs to
                    owners = {k: m for m, cls in METHODS.items() for k in _fields(cls)}
                    near = sub if sub in owners else nearest(sub, owners)
                    if near is not None and owners[near] not in chosen_methods:
                        typo = "" if near == sub else f"unknown key {plus}{key} (did you mean method.{near}?); "
                        raise UsageError(f"{typo}method.{near} belongs to method={owners[near]}; this run uses "
                                         f"method={','.join(chosen_methods)} (add method={owners[near]})")
                raise _unknown(f"key {plus}{key}", sub, sections[head], prefix=f"{head}.")
            if deeper:
                raise UsageError(f"unknown key {plus}{key} ({head}.{sub} has no keys under it)")
            kind = sections[head][sub]
        elif head in sections:
            raise UsageError(f"{key} is a section: set its keys, e.g. {head}.{next(iter(sections[head]))}=...")
        if plus == "+":
            raise UsageError(f"+{key}: {key} is already a setting; write {key}=... without the +")
        for v in _values(o):
            _check_type(key, v, kind)


def prepare(args: list[str]) -> list[str]:
    """The command line as Hydra should read it: prompts quoted, `<key>_file=` read, everything checked."""
    out, given = [], {}
    for arg in args:
        m = OVERRIDE.match(arg)
        if m is None or arg.startswith("-"):
            out.append(arg)  # a flag (-m, --cfg job, ...) or a group path (hydra/launcher=...)
            continue
        prefix, key, value = m["prefix"] or "", m["key"], m["value"]
        if key.endswith(FILE_SUFFIX) and key[: -len(FILE_SUFFIX)] in TEXT_KEYS:
            key, value = key[: -len(FILE_SUFFIX)], read_text_file(key[: -len(FILE_SUFFIX)], value)
        if key in TEXT_KEYS and not m["package"]:
            if key in given:
                raise UsageError(f"{key} is given twice ({given[key]} and {arg!r}); give it once")
            given[key] = repr(arg)
            out.append(f"{prefix}{key}={hydra_string(value)}")
        else:
            out.append(arg)
    check(out)
    return out
