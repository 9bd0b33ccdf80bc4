"""Settings declared once, as dataclass fields: defaults, ranges, choices and help in one place.

Every component (a pruner, a recovery, the allocation, the calibration and evaluation sections)
declares its settings as a dataclass whose fields are made with :func:`option`. From those fields
come, with no second copy anywhere:

- validation (:func:`check`): the type (a YAML ``"false"`` is not a boolean, ``nan`` is not a
  learning rate), the range and the choices, with one line naming the field, the value and what
  is allowed;
- the command-line flags and their ``--help`` (:func:`add_flags`), each help ending with its default;
- the YAML keys (the field names, nested by section) and the sweep keys (a recovery's own fields);
- what the setting changes (``changes``: the walk's result, the evaluation only, the saved files only, or
  nothing a result depends on) and where it applies (``needs``), from which come the commands that take
  it (:func:`commands_of`: ``ebft eval`` never shows a flag that does nothing there), a checkpoint's resume
  identity (:func:`ebft.checkpoint.settings_of`), a sweep cell's key (:func:`ebft.sweeps.cell_key`) and
  the refusal of a setting given where it does nothing (:func:`ebft.validate.unused_settings`).

>>> @dataclass
... class Example:
...     lr: float = option(2e-4, "learning rate", low=0, low_open=True)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

_MISSING = dataclasses.MISSING


# What a setting changes, and so which commands take it: the walk's result (and every number after it), the
# evaluation only, the saved files only, or nothing a result depends on (where and how the run runs).
CHANGES = ("result", "eval", "saved", "nothing")
COMMANDS = {"result": ("run", "sweep", "plan"), "eval": ("run", "sweep", "plan", "eval"), "saved": ("run",),
            "nothing": ("run",)}
# How a sweep cell's key holds a setting: "used" where it applies to the cell; "set" only where it applies
# and differs from its default (every setting added to a section after its first release: adding it keeps
# every finished cell); "always" whether it applies or not (the OWL settings, keyed so since OWL existed).
KEYED = ("used", "set", "always")


@dataclass(frozen=True)
class Needs:
    """Where a setting applies: where ``test`` holds of the run's setting ``key`` (``section.field``, or a
    field of the run's own); ``text`` says what it applies with, as a refusal names it (``--calib self``)."""

    key: str
    test: Callable[[Any], bool]
    text: str

    def met(self, settings: dict) -> bool:
        """Whether it holds in ``settings``, a run's settings as nested dicts (``RunConfig.to_dict()``, or a
        run.json's ``config``); a setting that is not there (a record older than it) holds its default."""
        section, _, name = self.key.rpartition(".")
        values = settings.get(section, {}) if section else settings
        return name not in values or bool(self.test(values[name]))

    def __and__(self, other: "Needs | AllNeeds") -> "AllNeeds":
        return AllNeeds((self, other))


@dataclass(frozen=True)
class AllNeeds:
    """Where a setting applies: where every one of ``parts`` holds (``needs_a & needs_b``)."""

    parts: tuple

    def met(self, settings: dict) -> bool:
        return all(part.met(settings) for part in self.parts)

    @property
    def text(self) -> str:
        return " and ".join(part.text for part in self.parts)

    def __and__(self, other: "Needs | AllNeeds") -> "AllNeeds":
        return AllNeeds((*self.parts, other))


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | Callable[[], tuple] | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           default_text: str | None = None, metavar: str | None = None, cli: bool = True,
           argparse_kwargs: dict | None = None, changes: str = "result", needs: Needs | None = None,
           commands: tuple[str, ...] | None = None, keyed: str = "used") -> Any:
    """A dataclass field with what the CLI, the YAML reader and the validation need.

    ``choices``: allowed values (or a function returning them, for registries filled at import).
    ``low``/``high``: numeric range, closed unless ``low_open``/``high_open``.
    ``default_text``: how ``--help`` shows the default when the value itself would not say it
    (``None`` meaning "the model's context", for instance). ``flag``: the flag's name when it is not
    ``--`` + the field name with dashes. ``cli=False``: YAML and API only.
    ``changes``: one of :data:`CHANGES`; it decides the commands that take the setting (:data:`COMMANDS`,
    unless ``commands`` names them), whether a checkpoint compares it and whether a sweep cell's key holds it.
    ``needs``: where the setting applies (:class:`Needs`); given elsewhere, it is refused as doing nothing.
    ``keyed``: how a sweep cell's key holds it (:data:`KEYED`); every setting added to a section after its
    first release declares ``keyed="set"``.
    """
    if changes not in CHANGES or keyed not in KEYED:
        raise ValueError(f"option: changes must be one of {CHANGES} and keyed one of {KEYED}")
    meta = dict(help=help, flag=flag, choices=choices, low=low, high=high, low_open=low_open,
                high_open=high_open, default_text=default_text, metavar=metavar, cli=cli,
                argparse_kwargs=argparse_kwargs or {}, changes=changes, needs=needs,
                commands=commands or COMMANDS[changes], keyed=keyed)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def fields_of(cls_or_obj) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls_or_obj) if "help" in f.metadata]


def field_type(cls, f: dataclasses.Field):
    """``(base type, optional)`` of a field: ``int | None`` -> ``(int, True)``; ``list[str]`` -> ``(list, False)``."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    return (origin or hint), optional


def choices_of(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is _MISSING else f.default


def changes_of(f: dataclasses.Field) -> str:
    return f.metadata.get("changes", "result")


def commands_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The commands that take the setting (``run``, ``sweep``, ``plan``, ``eval``)."""
    return f.metadata.get("commands") or COMMANDS[changes_of(f)]


def needs_of(f: dataclasses.Field) -> Needs | None:
    return f.metadata.get("needs")


def keyed_mode(f: dataclasses.Field) -> str:
    return f.metadata.get("keyed", "used")


# ----------------------------------------------------------------------------- validation

def _range_text(meta, kind: str) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"{kind} in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{kind} {'>' if meta['low_open'] else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if meta['high_open'] else '<='} {high:g}"
    return kind


def _in_range(value, meta) -> bool:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        return False
    return True


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def coerce(obj, f: dataclasses.Field, name: str):
    """Check one field's value against its declaration; return it normalised (an int for a float
    field becomes a float; YAML's ``1e-3``, read as a string by PyYAML, becomes 0.001)."""
    value = getattr(obj, f.name)
    base, optional = field_type(type(obj), f)
    meta = f.metadata
    if value is None:
        if optional:
            return None
        raise ConfigError(name, value, f"required: {_describe(base, meta, f)}")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "must be true or false")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, f"must be {_range_text(meta, 'an integer')}")
        if not _in_range(value, meta) or abs(value) >= 2**63:
            raise ConfigError(name, value, f"must be {_range_text(meta, 'an integer')}")
    elif base is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, f"must be {_range_text(meta, 'a number')}")
        value = float(value)
        if not math.isfinite(value) or not _in_range(value, meta):
            raise ConfigError(name, value, f"must be {_range_text(meta, 'a finite number')}")
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
    elif base is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, value, "must be a list of strings")
    choices = choices_of(f)
    if choices is not None and value not in choices and not (base is list and set(value) <= set(choices)):
        raise ConfigError(name, value, f"allowed: {', '.join(map(str, choices))}")
    return value


def _describe(base, meta, f) -> str:
    if base is bool:
        return "true or false"
    if base is int:
        return _range_text(meta, "an integer")
    if base is float:
        return _range_text(meta, "a number")
    return "a value"


def check(obj, prefix: str = "") -> None:
    """Validate (and normalise in place) every declared field of the dataclass ``obj``.

    A dataclass may add cross-field rules in a ``check_more(self, prefix)`` method."""
    for f in fields_of(obj):
        setattr(obj, f.name, coerce(obj, f, f"{prefix}{f.name}"))
    more = getattr(obj, "check_more", None)
    if more is not None:
        more(prefix)


def subset(obj, cls):
    """An instance of ``cls`` holding ``obj``'s values for ``cls``'s fields (a method's own settings,
    picked out of a section that composes several methods)."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


def compose(name: str, base: list[tuple[str, type, dataclasses.Field]], parts: list[type], doc: str,
            defaults_from: dict[str, str] | None = None) -> type:
    """A dataclass with ``base`` fields and the union of the fields of ``parts``.

    Two parts may declare the same field (EBFT and mask tuning share ``epochs``) only with the same
    type and default: a setting means one thing in a section. ``defaults_from`` names fields whose
    default is decided elsewhere (a recipe): they become optional, None meaning "not given", and
    ``--help`` shows the given text as their default."""
    defaults_from = defaults_from or {}
    seen: dict[str, tuple] = {}
    specs = list(base)
    own = {n for n, _, _ in base}
    for part in parts:
        hints = typing.get_type_hints(part)
        for f in dataclasses.fields(part):
            if f.name in own:
                raise TypeError(f"{name}: setting {f.name!r} is one of the section's own settings")
            spec = (hints[f.name], default_of(f))
            if f.name in seen:
                if seen[f.name] != spec:
                    raise TypeError(f"{name}: setting {f.name!r} is declared twice with different types or defaults")
                continue
            seen[f.name] = spec
            if f.name in defaults_from:
                meta = {**f.metadata, "default_text": defaults_from[f.name]}
                specs.append((f.name, hints[f.name] | None, field(default=None, metadata=meta)))
            else:
                specs.append((f.name, hints[f.name], _copy_field(f)))
    cls = dataclasses.make_dataclass(name, specs)
    cls.__doc__ = doc
    return cls


# ----------------------------------------------------------------------------- one flag per setting

_FLAGS: dict[str, tuple[str, str, set]] = {}  # flag -> (section, field, who declared it)


def _flags_of(specs) -> list[tuple[str, str]]:
    """``(field name, flag)`` of a settings dataclass, or of ``(name, type, field)`` specs (a section's base)."""
    if isinstance(specs, type):
        return [(f.name, flag_of(f)) for f in fields_of(specs) if f.metadata.get("cli", True)]
    return [(n, f.metadata.get("flag") or "--" + n.replace("_", "-")) for n, _, f in specs if f.metadata.get("cli", True)]


def flag_clash(specs, section: str) -> str | None:
    """Why ``specs`` cannot take their flags (one flag is one setting, across every section): None if they can.
    The same field of the same section may be declared by several methods (they share it)."""
    for name, flag in _flags_of(specs):
        if flag in _FLAGS and _FLAGS[flag][:2] != (section, name):
            owner = ", ".join(sorted(_FLAGS[flag][2]))
            return f"setting {name!r} would be the flag {flag}, which {owner} already declares"
    return None


def claim_flags(specs, section: str, owner: str) -> None:
    """Record the flags of ``specs`` (a settings dataclass or a section's base specs) as ``owner``'s."""
    problem = flag_clash(specs, section)
    if problem is not None:
        raise ValueError(f"{owner}: {problem}")
    for name, flag in _flags_of(specs):
        _FLAGS.setdefault(flag, (section, name, set()))[2].add(owner)


def release_flags(owner: str) -> None:
    """Forget ``owner``'s flags (an unregistered method); a flag another method shares stays."""
    for flag in list(_FLAGS):
        _FLAGS[flag][2].discard(owner)
        if not _FLAGS[flag][2]:
            del _FLAGS[flag]


METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SETTING_TYPES = (bool, int, float, str, list)


def check_registration(kind: str, name, fn, settings, section: str, base, others) -> None:
    """A pruner's or recovery's registration checked when it is made, as one ``ValueError`` naming the method:
    its name (it becomes a flag value, a YAML value, a file name, an item of a comma-separated list), its
    function, and its settings (a dataclass whose fields all have defaults and plain types, composing with
    the section's ``base`` fields and the ``others`` methods' settings), so that a bad plugin never breaks
    a later run."""
    if not isinstance(name, str) or not METHOD_NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r}: use lowercase letters, digits, '-' and '_' (first a letter or "
                         "digit, at most 64)")
    if not callable(fn):
        raise ValueError(f"{kind} {name!r}: {fn!r} is not a function")
    if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        raise ValueError(f"{kind} {name!r}: settings must be a dataclass (fields declared with "
                         f"ebft.settings.option), not {settings!r}")
    try:
        for f in dataclasses.fields(settings):
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise TypeError(f"setting {f.name!r} has no default")
            if field_type(settings, f)[0] not in _SETTING_TYPES:
                raise TypeError(f"setting {f.name!r} is not a bool, int, float, str or list of str")
        compose(section, list(base), [*others, settings], "")
    except (TypeError, ValueError, NameError) as exc:
        raise ValueError(f"{kind} {name!r}: its settings do not fit the {section} section ({exc})") from None
    problem = flag_clash(settings, section)
    if problem is not None:
        raise ValueError(f"{kind} {name!r}: {problem}")


def register(kind: str, registry: dict, name, fn, settings, section: str, base, make_entry: Callable[[], Any],
             shared: tuple = ()) -> None:
    """Add a pruner or recovery: its registration checked (:func:`check_registration`, against the section's
    ``base`` fields, the ``shared`` settings classes of the section and the settings already registered),
    ``make_entry()`` stored under ``name``, its flags claimed."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} is registered twice")
    others = [*shared, *(entry.settings for entry in registry.values())]
    check_registration(kind, name, fn, settings, section, base, others)
    registry[name] = make_entry()
    claim_flags(settings, section, f"{kind} {name!r}")


def unregister(kind: str, registry: dict, name: str) -> None:
    """Remove a registered pruner or recovery (a plugin or a test that registered its own)."""
    registry.pop(name, None)
    release_flags(f"{kind} {name!r}")


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default is _MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


# ----------------------------------------------------------------------------- the command line

def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("default_text")
    if text is not None:
        return text
    value = default_of(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) if value else "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def help_of(f: dataclasses.Field) -> str:
    choices = choices_of(f)
    text = f.metadata["help"]
    if choices and "{choices}" in text:
        text = text.replace("{choices}", " | ".join(map(str, choices)))
    default = _default_text(f)
    return f"{text} ({default})" if default.startswith("required") else f"{text} (default: {default})"


def add_flags(parser: argparse.ArgumentParser, cls, path: str, skip=frozenset(), command: str = "run"
              ) -> dict[str, str]:
    """Add one flag per CLI field of ``cls`` that ``command`` takes (:func:`commands_of`) to ``parser``;
    return ``{dest: "section.field"}``.

    Every flag defaults to None (= not given), so a YAML file's values stand unless a flag is typed."""
    dests = {}
    for f in fields_of(cls):
        meta = f.metadata
        flag = flag_of(f)
        if not meta.get("cli", True) or flag in skip or command not in commands_of(f):
            continue
        base, _ = field_type(cls, f)
        kwargs: dict = dict(default=None, help=help_of(f).replace("%", "%%"))  # argparse formats help with %
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is int:
            kwargs["type"] = _parse_int
        elif base is float:
            kwargs["type"] = float
        elif base is list:
            kwargs["nargs"] = "+"
        if base is not bool:
            kwargs["metavar"] = meta.get("metavar") or f.name.upper()
        kwargs.update(meta.get("argparse_kwargs") or {})
        key = f"{path}.{f.name}" if path else f.name
        dest = key.replace(".", "__")
        parser.add_argument(flag, dest=dest, **kwargs)
        dests[dest] = key
    return dests


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer value: {text!r}") from None
