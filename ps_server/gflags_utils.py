"""Absl flags from dataclass docstrings (Monolith's ``gflags_utils``, docs/semantics.md §10).

A config dataclass documents each field with a ``:param name: help`` line in its class
docstring. From that:

* :func:`extract_help_info` reads the docstring(s) into ``{field: help}``;
* :func:`extract_flags` / :func:`extract_flags_decorator` define one absl flag per documented
  ``int``/``bool``/``str``/``float``/``Enum`` field, with the dataclass default as the flag
  default;
* :func:`update` copies parsed flag values into a config instance, field by field, when the
  instance still holds the dataclass default and the flag differs from it;
* :class:`LinkDataclassToFlags` + :func:`update_by_flags` tie fields to (possibly differently
  named) flags and apply them at construction time, when the flag was set away from *its own*
  default.

Flag definitions go to ``gflags.FLAGS`` for :func:`extract_flags`; everything else reads
``absl.flags.FLAGS`` when called (not at import), so a caller or test may swap that object.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, Protocol, TypeVar, get_type_hints

from absl import flags

__all__ = [
    "FlagsModule",
    "LinkDataclassToFlags",
    "extract_flags",
    "extract_flags_decorator",
    "extract_help_info",
    "get_flags_parser",
    "update",
    "update_by_flags",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_C = TypeVar("_C", bound=type)

#: A docstring line (already stripped and whitespace-folded) that opens a help entry.
_PARAM_LINE = re.compile(r"^:param\s+([a-zA-Z0-9._-]+)\s*:\s*(.*)")

#: Class attribute holding a class's ``{field: flag}`` links (see :class:`LinkDataclassToFlags`).
_META_ATTR = "_monolith_gflag_meta"


class FlagsModule(Protocol):
    """What the ``gflags``/``flags`` arguments need: the ``absl.flags`` module fits."""

    @property
    def FLAGS(self) -> flags.FlagValues: ...
    @property
    def Error(self) -> type[Exception]: ...
    @property
    def DEFINE_integer(self) -> Callable[..., Any]: ...
    @property
    def DEFINE_bool(self) -> Callable[..., Any]: ...
    @property
    def DEFINE_string(self) -> Callable[..., Any]: ...
    @property
    def DEFINE_float(self) -> Callable[..., Any]: ...
    @property
    def DEFINE_enum(self) -> Callable[..., Any]: ...


# ---------------------------------------------------------------------------------------------
# Docstring → help
# ---------------------------------------------------------------------------------------------


def _doc_lines(cls: type) -> list[str]:
    """``cls.__doc__`` split on newlines, each line stripped with whitespace runs folded to one
    space, blank lines dropped. Raises AssertionError when nothing is left (or no docstring)."""
    doc = cls.__doc__
    lines = [] if doc is None else [" ".join(line.split()) for line in doc.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        raise AssertionError(f"{cls!r} has no docstring to read :param help lines from")
    return lines


def _read_help_level(cls: type, into: dict[str, list[str]]) -> None:
    """Add the ``:param`` entries of ``cls``'s own docstring to ``into`` (overwriting)."""
    previous: str | None = None
    for line in _doc_lines(cls):
        match = _PARAM_LINE.match(line)
        if match is not None:
            name, text = match.group(1), match.group(2)
            if name == previous:
                raise AssertionError(f"{cls!r}: ':param {name}:' given twice in a row")
            into[name] = [text]
            previous = name
        elif previous is not None:
            # Anything after the first :param continues the current entry, ``:return:`` included.
            into[previous].append(line)


def _read_help(cls: type, into: dict[str, list[str]], is_nested: bool) -> None:
    if is_nested:
        # Every direct base, ``object`` included. ``object.__doc__`` is an ordinary non-empty
        # docstring without ``:param`` lines, so it adds nothing and needs no special case.
        for base in cls.__bases__:
            _read_help(base, into, is_nested)
    _read_help_level(cls, into)


def extract_help_info(cls: type, is_nested: bool = True) -> dict[str, str]:
    """Return ``{name: help}`` from the ``:param name: help`` lines of ``cls``'s docstring.

    Each docstring line is stripped and its whitespace runs folded to one space; blank lines
    are dropped. A ``:param`` line opens an entry; every later non-``:param`` line (a wrapped
    continuation, a ``:return:`` line, …) is appended to the open entry, and the pieces are
    joined with one space. Lines before the first ``:param`` are ignored.

    With ``is_nested``, the docstrings of all bases (recursively, down to ``object``) are read
    first, so a subclass's entries overwrite its bases'. Within one docstring a repeated name
    overwrites the earlier entry.

    Raises:
        AssertionError: a class read (``cls`` or, when nested, any base) has a blank or missing
            docstring, or names the same ``:param`` twice in a row.
    """
    pieces: dict[str, list[str]] = {}
    _read_help(cls, pieces, is_nested)
    return {name: " ".join(parts) for name, parts in pieces.items()}


# ---------------------------------------------------------------------------------------------
# Dataclass → flag definitions
# ---------------------------------------------------------------------------------------------


def _define_flag(gflags: FlagsModule, name: str, dtype: Any, default: Any, help_text: str) -> None:
    """Define one flag of the kind matching ``dtype``; raise for an unsupported type."""
    fv = gflags.FLAGS
    described = f"default={default}, {help_text}"
    if dtype is int:
        gflags.DEFINE_integer(name, default, f"int, {described}", flag_values=fv)
    elif dtype is bool:
        gflags.DEFINE_bool(name, default, f"bool, {described}", flag_values=fv)
    elif dtype is str:
        gflags.DEFINE_string(name, default, f"string, {described}", flag_values=fv)
    elif dtype is float:
        gflags.DEFINE_float(name, default, f"float, {described}", flag_values=fv)
    elif issubclass(dtype, Enum):
        choices = [member.name.lower() for member in dtype]
        gflags.DEFINE_enum(
            name, default.name.lower(), choices, f"enum, {described}", flag_values=fv
        )
    else:
        raise TypeError(f"no flag kind for {dtype!r}: only int, bool, str, float and Enum")


def extract_flags(
    gflags: FlagsModule,
    dcls: type,
    is_nested: bool = True,
    skip_flags: Collection[str] | None = None,
) -> flags.FlagValues:
    """Define an absl flag in ``gflags.FLAGS`` for each documented field of ``dcls``.

    Fields are the type hints of ``dcls`` (inherited ones included). A field is skipped when
    it has no help in :func:`extract_help_info` ``(dcls, is_nested)`` or is in ``skip_flags``.
    Otherwise the flag has the field's name, the class attribute as default and the help
    ``"<kind>, default=<default>, <help>"``: ``int`` → integer flag (kind ``int``), ``bool`` →
    bool (``bool``), ``str`` → string (``string``), ``float`` → float (``float``), an ``Enum``
    subclass → enum flag (``enum``) whose choices are the member names lower-cased and whose
    default is the default member's name lower-cased. Any other type, and any error while
    defining (an already defined name, a bad default, …), leaves that field without a flag,
    silently.

    Returns:
        ``gflags.FLAGS``.

    Raises:
        AssertionError: from :func:`extract_help_info`.
        AttributeError: a documented, not skipped field has no class attribute (no default,
            or a ``default_factory``).
        NameError: a type hint cannot be resolved.
    """
    fv = gflags.FLAGS
    help_info = extract_help_info(dcls, is_nested)
    skipped = skip_flags if skip_flags is not None else ()
    for name, dtype in get_type_hints(dcls).items():
        if name not in help_info or name in skipped:
            continue
        default = getattr(dcls, name)
        try:
            _define_flag(gflags, name, dtype, default, help_info[name])
        except Exception:  # Monolith ignores every failure here
            continue
    return fv


def extract_flags_decorator(
    remove_flags: Collection[str] | None = None, is_nested: bool = True
) -> Callable[[_C], _C]:
    """Class decorator: :func:`extract_flags` on the class with ``absl.flags`` at definition.

    ``remove_flags`` names fields that get no flag (passed as ``skip_flags``; a flag of that
    name defined elsewhere is left alone). The class is returned unchanged.
    """

    def decorate(cls: _C) -> _C:
        extract_flags(flags, cls, is_nested, skip_flags=remove_flags)
        return cls

    return decorate


def get_flags_parser(
    flags: FlagsModule, FLAGS: flags.FlagValues
) -> Callable[[Sequence[str]], list[str]]:
    """Return ``parse(argv)``: ``FLAGS(argv)``, giving back the arguments that are not flags.

    On a ``flags.Error`` (unknown flag, bad value, …) ``parse`` logs the error and the flags'
    help, then exits the process with ``sys.exit(1)`` (so :class:`SystemExit` with code 1).
    """

    def parse(argv: Sequence[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except flags.Error as error:
            _log.error(
                "Cannot parse the command-line flags: %s\n%s",
                error,
                FLAGS.get_help(include_special_flags=False),
            )
            _log.error("Run with --helpshort or --helpfull to list the flags.")
            sys.exit(1)

    return parse


# ---------------------------------------------------------------------------------------------
# Parsed flags → config instances
# ---------------------------------------------------------------------------------------------

_NO_DEFAULT = object()


def _dataclass_default(cls: type, name: str) -> Any:
    """The default of field ``name``: the class attribute, else the dataclass field's default
    or ``default_factory()``; ``_NO_DEFAULT`` for a field without any."""
    attr = getattr(cls, name, _NO_DEFAULT)
    if attr is _NO_DEFAULT:
        field = getattr(cls, "__dataclass_fields__", {}).get(name)
        if field is None:
            return _NO_DEFAULT
        attr = field
    if isinstance(attr, dataclasses.Field):
        if attr.default is not None and attr.default is not dataclasses.MISSING:
            return attr.default
        if attr.default_factory is not dataclasses.MISSING:
            return attr.default_factory()
        return None if attr.default is None else _NO_DEFAULT
    return attr


def update(config: _T) -> _T:
    """Copy parsed ``absl.flags.FLAGS`` values into ``config``'s fields that kept their default.

    For each type-hinted field of ``type(config)`` that has a flag of the same name (an
    unparsed ``FLAGS`` counts as having none): with ``default`` the dataclass default,
    ``from_code`` the instance's value and ``from_cmd`` the flag's value (for an ``Enum``
    field, the member named ``value.upper()``), the field is set to ``from_cmd`` when
    ``from_code == default`` and ``from_cmd != default``. The comparison is with the
    *dataclass* default, so a flag whose own default differs from it wins even when not given
    on the command line. Fields are written past ``frozen``. Fields without any default are
    left alone.

    Returns:
        ``config`` itself.

    Raises:
        KeyError: an ``Enum`` flag value whose upper-cased form is not a member name.
    """
    fv = flags.FLAGS
    cls = type(config)
    for name, dtype in get_type_hints(cls).items():
        try:
            if not hasattr(fv, name):
                continue
        except Exception:  # e.g. UnparsedFlagAccessError: treat as absent
            continue
        default = _dataclass_default(cls, name)
        if default is _NO_DEFAULT:
            continue
        from_code = getattr(config, name, default)
        from_cmd = getattr(fv, name)
        if isinstance(dtype, type) and issubclass(dtype, Enum):
            from_cmd = dtype[from_cmd.upper()]
        if from_code == default and from_cmd != default:
            object.__setattr__(config, name, from_cmd)
    return config


class LinkDataclassToFlags:
    """Class decorator linking dataclass fields to absl flags, for :func:`update_by_flags`.

    ``linked_map`` maps field name → flag name; each name in ``linked_list`` links the field to
    the flag of the same name (added after ``linked_map``, so it wins on a shared field). When
    applied to a class, every link is checked against the class's dataclass fields and against
    ``absl.flags.FLAGS``, then the links are added to the class attribute
    ``_monolith_gflag_meta`` (``{field: flag}``). Like Monolith, a class that inherits that
    attribute adds to its base's dict rather than getting its own.

    Raises (when applied):
        AssertionError: the class is not a dataclass.
        ValueError: ``"<field> is not a valid attribute of <class>"`` or
            ``"<flag> is not defined in gflags"``; nothing is stored then.
    """

    def __init__(
        self,
        linked_list: Iterable[str] | None = None,
        linked_map: Mapping[str, str] | None = None,
    ) -> None:
        self.links: dict[str, str] = dict(linked_map or {})
        for name in linked_list or ():
            self.links[name] = name

    def __call__(self, cls: _C) -> _C:
        if not dataclasses.is_dataclass(cls):
            raise AssertionError(f"{cls!r} is not a dataclass; only dataclasses can be linked")
        fields = {field.name for field in dataclasses.fields(cls)}
        fv = flags.FLAGS
        for field_name, flag_name in self.links.items():
            if field_name not in fields:
                raise ValueError(f"{field_name} is not a valid attribute of {cls}")
            if flag_name not in fv:
                raise ValueError(f"{flag_name} is not defined in gflags")
        if not hasattr(cls, _META_ATTR):
            setattr(cls, _META_ATTR, {})
        getattr(cls, _META_ATTR).update(self.links)
        return cls


def update_by_flags(cls: _C) -> _C:
    """Class decorator: after ``__init__``, apply the flags linked to the dataclass's fields.

    The links are those of every class in ``cls``'s MRO, taken now (at decoration) and merged
    in MRO order, ``cls`` first, a later class winning on a shared field; so links declared on
    a base hold for a decorated subclass. After the original ``__init__``, a linked field is set
    to the flag's value when the field equals its ``dataclass.field`` default and the flag's
    value differs from the flag's own default (a field with a ``default_factory`` or no default
    never matches). Links naming a field ``cls`` does not have are ignored (they reach a base's
    shared dict from a sibling subclass). Works on frozen dataclasses.

    Raises:
        AssertionError: ``cls`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(cls):
        raise AssertionError(f"{cls!r} is not a dataclass; update_by_flags needs one")
    merged: dict[str, str] = {}
    for klass in inspect.getmro(cls):
        merged.update(getattr(klass, _META_ATTR, {}))
    fields = {field.name: field for field in dataclasses.fields(cls)}
    # A base's shared links dict may hold a sibling subclass's fields (see
    # LinkDataclassToFlags); those are not ours to set.
    links = {name: flag for name, flag in merged.items() if name in fields}
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        fv = flags.FLAGS
        for field_name, flag_name in links.items():
            flag = fv[flag_name]
            if getattr(self, field_name) == fields[field_name].default and (
                flag.value != flag.default
            ):
                object.__setattr__(self, field_name, flag.value)

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy rejects assigning to cls.__init__
    return cls
