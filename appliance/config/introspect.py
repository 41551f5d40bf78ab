"""Walking a msgspec schema by its `msgspec.inspect` description: the types under key paths, the fields marked
secret, the choices of a Literal, and redaction. Knows no particular schema, so that the schema can use it."""

from __future__ import annotations

from typing import Any

from msgspec import inspect as mi


def unwrap(t: mi.Type) -> mi.Type:
    """The type under a field's metadata and its `| None`, if any."""
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        if len(members) == 1:
            return unwrap(members[0])
    return t


def struct_fields(t: mi.Type | None) -> tuple[mi.Field, ...]:
    t = unwrap(t) if t is not None else None
    return t.fields if isinstance(t, mi.StructType) else ()


def schema_at(root: mi.Type, path: tuple) -> mi.Type | None:
    """The type at `path` (keys and list indices) below `root`, or None where the schema has no such key."""
    t = root
    for part in path:
        if isinstance(part, int):
            inner = unwrap(t)
            t = inner.item_type if isinstance(inner, (mi.VarTupleType, mi.ListType)) else None
        else:
            t = next((f.type for f in struct_fields(t) if f.name == part), None)
        if t is None:
            return None
    return t


def is_secret(t: mi.Type | None) -> bool:
    return isinstance(t, mi.Metadata) and bool((t.extra or {}).get("secret"))


def literal_values(t: mi.Type | None) -> list:
    if isinstance(t, mi.Metadata):
        t = t.type
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    return [v for m in members for v in (m.values if isinstance(m, mi.LiteralType) else
                                         (None,) if isinstance(m, mi.NoneType) else ())]


def redact(value: Any, t: mi.Type) -> Any:
    """`value` (plain data of type `t`) with every secret replaced by '***'."""
    if is_secret(t):
        return "***"
    t = unwrap(t)
    if isinstance(value, dict) and isinstance(t, mi.StructType):
        return {f.name: redact(value[f.name], f.type) for f in t.fields}
    if isinstance(value, (list, tuple)) and isinstance(t, (mi.VarTupleType, mi.ListType)):
        return [redact(v, t.item_type) for v in value]
    return value
