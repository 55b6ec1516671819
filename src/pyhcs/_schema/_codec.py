"""hcsshim's JSON wire form: the document base class, Go's integer types, and the codec.

Writing gives what hcsshim's Go ``encoding/json`` field names give, with every field that
holds its default left out. Reading accepts what Go's ``encoding/json`` accepts from
hcsshim-written JSON: ``null`` means "leave the default", Go's zero time means "no time",
unknown fields are ignored and field names match case-insensitively.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar, get_args, get_origin, overload

import msgspec
import msgspec.inspect as mi

from pyhcs._errors import InvalidConfigError

__all__ = [
    "Document",
    "Int64",
    "Time",
    "UInt",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "from_dict",
    "from_json",
    "to_dict",
    "to_json",
    "validate",
]

T = TypeVar("T")

# Go's integer types, so that loading rejects what Go's decoder rejects (a negative
# value for an unsigned field, an overflow) instead of carrying it into the runtime.
UInt8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
UInt16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
# msgspec cannot express le=2**64-1 (bounds must fit an int64), so uint64 is ge=0 alone
# and loading checks its upper bound itself (see _UINT64_MAX).
UInt64 = Annotated[int, msgspec.Meta(ge=0)]
#: Go's ``uint``: 64 bits on every Linux target pyhcs supports.
UInt = UInt64
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: Go's ``time.Time`` in JSON is RFC 3339 and always carries an offset; a naive time is invalid.
Time = Annotated[datetime, msgspec.Meta(tz=True)]


class Document(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every hcsshim JSON document: a mutable value object compared field by field.

    Construction does not validate (msgspec checks types and ranges only while loading;
    ``HNSEndpoint.ip_address`` is the one exception): call :func:`validate` on a document
    built in Python before acting on it.
    """


# --------------------------------------------------------------------------- writing


@overload
def to_dict(obj: Document) -> dict[str, Any]: ...
@overload
def to_dict(obj: Sequence[Document]) -> list[dict[str, Any]]: ...
def to_dict(obj: Document | Sequence[Document]) -> dict[str, Any] | list[dict[str, Any]]:
    """The JSON-shaped form of *obj* (a document or a list of them), as :func:`to_json` writes it.

    Keys are hcsshim's names; fields holding their default are left out, nested documents
    included; times become RFC 3339 strings. Raises :class:`InvalidConfigError`
    (``Encode<Type>``) if a field holds a value JSON cannot carry.
    """
    try:
        raw = msgspec.to_builtins(obj)
    except (TypeError, ValueError, msgspec.EncodeError) as e:
        raise InvalidConfigError(f"Encode{_value_name(obj)}", message=str(e)) from e
    return _prune_value(obj, raw)  # type: ignore[no-any-return]


def to_json(obj: Document | Sequence[Document]) -> bytes:
    """*obj* (a document or a list of them) as hcsshim JSON: hcsshim's names, defaults omitted.

    Unlike Go, fields holding their default are never written, so ``SystemType`` is left out
    when it is ``"Container"``; :func:`from_json` restores it. Policy documents are the
    exception: they are always written whole (see ``NatPolicy``).
    """
    return msgspec.json.encode(to_dict(obj))


def _prune_value(obj: Any, raw: Any) -> Any:
    if isinstance(obj, Document):
        return _prune(raw, _type_info(type(obj)))
    if isinstance(obj, list | tuple) and isinstance(raw, list):
        return [_prune_value(o, r) for o, r in zip(obj, raw, strict=True)]
    return raw


def _prune(raw: Any, t: mi.Type) -> Any:
    # msgspec's omit_defaults only drops a value that *is* the default object (or an empty
    # collection): a loaded "Container" or (0, 0), or a nested document equal to its
    # default_factory(), would still be written. Compare the encoded forms instead.
    if isinstance(t, mi.StructType) and isinstance(raw, dict):
        omit = t.cls.__struct_config__.omit_defaults
        defaults = _encoded_defaults(t.cls)
        for f in t.fields:
            if f.encode_name not in raw:
                continue
            sub = _prune(raw[f.encode_name], f.type)
            if omit and sub == defaults[f.encode_name]:
                del raw[f.encode_name]
            else:
                raw[f.encode_name] = sub
        return raw
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, mi.StructType) and isinstance(raw, dict):
                return _prune(raw, member)
        return raw
    if isinstance(t, mi.ListType) and isinstance(raw, list):
        return [_prune(item, t.item_type) for item in raw]
    if isinstance(t, mi.DictType) and isinstance(raw, dict):
        return {k: _prune(v, t.value_type) for k, v in raw.items()}
    return raw


@functools.cache
def _encoded_defaults(cls: Any) -> dict[str, Any]:
    """Each field's default in JSON shape, by JSON name (never handed out: compared only)."""
    info = _type_info(cls)
    assert isinstance(info, mi.StructType)
    return {
        f.encode_name: _prune(
            msgspec.to_builtins(
                f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            ),
            f.type,
        )
        for f in info.fields
    }


# --------------------------------------------------------------------------- reading


def from_json(cls: type[T], data: bytes | str) -> T:
    """Load hcsshim JSON *data* as *cls* (a document type, or ``list[<document type>]``).

    Accepts what Go's ``encoding/json`` accepts from hcsshim-written JSON: ``null`` leaves a
    field at its default (a list or map becomes empty, an optional field ``None``),
    ``"0001-01-01T00:00:00Z"`` (Go's zero time) loads as ``None``, unknown fields are ignored
    and names match case-insensitively, nested documents included. Raises
    :class:`InvalidConfigError` (``Decode<Type>``) for malformed JSON or an invalid value;
    its message names the field path, e.g. ``$.Layers[0].ID``.
    """
    operation = f"Decode{_type_name(cls)}"
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise InvalidConfigError(operation, message=f"malformed JSON: {e}") from e
    return _load(cls, raw, operation)


def from_dict(cls: type[T], mapping: object) -> T:
    """Load a JSON-shaped *mapping* (as :func:`to_dict` gives, or ``json.loads`` does) as *cls*.

    Same rules and errors as :func:`from_json`; *mapping* is not modified.
    """
    return _load(cls, mapping, f"Decode{_type_name(cls)}")


def validate(obj: Document) -> None:
    """Check a document built in Python as :func:`from_json` would check its JSON.

    Raises :class:`InvalidConfigError` (``Validate<Type>``) naming the first invalid field,
    e.g. a negative value for an unsigned Go field or a time without an offset.
    """
    _load(type(obj), to_dict(obj), f"Validate{type(obj).__name__}")


def _load(cls: type[T], raw: object, operation: str) -> T:
    try:
        return msgspec.convert(_normalize(raw, _type_info(cls)), cls)
    except msgspec.ValidationError as e:
        raise InvalidConfigError(operation, message=str(e)) from e


#: The upper bound of an unbounded ``ge=0`` integer (``UInt64``), checked by :func:`_normalize`.
_UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def _normalize(value: Any, t: mi.Type, path: str = "$") -> Any:
    """*value* rewritten as Go's decoder would see it for type *t*, ready for msgspec.convert.

    *path* locates *value* in the document, in msgspec's notation, for the errors raised here.
    """
    if value is None:
        return None if _accepts_none(t) else _zero(t)
    if isinstance(t, mi.StructType):
        return _normalize_struct(value, t, path) if isinstance(value, Mapping) else value
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _normalize(value, members[0], path) if len(members) == 1 else value
    if isinstance(t, mi.IntType):
        if t.ge == 0 and t.le is None and type(value) is int and value > _UINT64_MAX:
            raise msgspec.ValidationError(f"Expected `int` <= {_UINT64_MAX} - at `{path}`")
        return value
    if isinstance(t, mi.DateTimeType):
        # Go writes its zero time.Time rather than omitting it; it means "no time".
        return None if isinstance(value, str) and _is_zero_time(value) else value
    if isinstance(t, mi.ListType) and isinstance(value, list):
        return [_normalize(item, t.item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(t, mi.TupleType) and isinstance(value, list):
        # A Go array takes a shorter JSON array zero-padded and drops the extra elements.
        n = len(t.item_types)
        items = value[:n] + [None] * (n - len(value))
        return [
            _normalize(item, it, f"{path}[{i}]")
            for i, (item, it) in enumerate(zip(items, t.item_types, strict=True))
        ]
    if isinstance(t, mi.DictType) and isinstance(value, Mapping):
        # Map keys are data, not field names: Go does not fold their case.
        return {k: _normalize(v, t.value_type, f"{path}[...]") for k, v in value.items()}
    return value


def _normalize_struct(value: Mapping[Any, Any], t: mi.StructType, path: str) -> dict[str, Any]:
    exact, folded = _field_index(t.cls)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            continue
        # As Go: an exact match first, then a case-insensitive one; unknown keys are ignored.
        f = exact.get(key) or folded.get(_fold(key))
        if f is None:
            continue
        if item is None:
            # Go's null sets a pointer, slice or map to nil and leaves any other field as
            # it was: its default, or what an earlier duplicate key set.
            if _accepts_none(f.type):
                out[f.encode_name] = None
            elif isinstance(f.type, mi.ListType | mi.DictType):
                out[f.encode_name] = _zero(f.type)
            continue
        out[f.encode_name] = _normalize(item, f.type, f"{path}.{f.encode_name}")
    return out


def _accepts_none(t: mi.Type) -> bool:
    if isinstance(t, mi.NoneType | mi.AnyType):
        return True
    return isinstance(t, mi.UnionType) and any(_accepts_none(m) for m in t.types)


def _zero(t: mi.Type) -> Any:
    """Go's zero value for *t*, in JSON shape (what a ``null`` element decodes to)."""
    if isinstance(t, mi.StrType):
        return ""
    if isinstance(t, mi.BoolType):
        return False
    if isinstance(t, mi.IntType):
        return 0
    if isinstance(t, mi.FloatType):
        return 0.0
    if isinstance(t, mi.ListType):
        return []
    if isinstance(t, mi.DictType | mi.StructType):
        return {}
    if isinstance(t, mi.TupleType):
        return [_zero(it) for it in t.item_types]
    return None


def _is_zero_time(text: str) -> bool:
    try:
        when = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        return False  # left for msgspec.convert to report with the field's path
    return when.utcoffset() == timedelta(0) and when.replace(tzinfo=None) == datetime.min


def _fold(name: str) -> str:
    """*name* case-folded as Go's field matching folds it (simple folding, char by char).

    Go maps the Kelvin sign to ``k`` and the long s to ``s`` but, unlike ``str.casefold``,
    never ``ß`` to ``ss``.
    """
    out = []
    for c in name:
        upper = c.upper()
        lower = upper.lower() if len(upper) == 1 else c
        out.append(lower if len(lower) == 1 else c)
    return "".join(out)


def _type_info(cls: Any) -> mi.Type:
    return _type_info_cached(cls)


_type_info_cached = functools.cache(mi.type_info)


@functools.cache
def _field_index(cls: Any) -> tuple[dict[str, mi.Field], dict[str, mi.Field]]:
    info = _type_info(cls)
    assert isinstance(info, mi.StructType)
    exact = {f.encode_name: f for f in info.fields}
    folded = {_fold(f.encode_name): f for f in info.fields}
    return exact, folded


def _type_name(cls: Any) -> str:
    if get_origin(cls) is list:
        (item,) = get_args(cls)
        return f"{_type_name(item)}List"
    return str(getattr(cls, "__name__", cls))


def _value_name(obj: object) -> str:
    if isinstance(obj, list | tuple) and obj:
        return f"{type(obj[0]).__name__}List"
    return type(obj).__name__
