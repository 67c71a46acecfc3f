"""Option values without pydantic where typer would build it for nothing.

typer 0.28+ converts every option's value through a pydantic TypeAdapter, built when the option is first
processed, default or not: importing pydantic and building the adapters of one command costs ~80 ms, more
than everything else `plan --json` does. Most values need no conversion at all (a default, a string for a
`str` option) or a trivial one ("4096" for an `int` option): those are taken here, with the same result
pydantic gives. Anything else (a malformed number, a value from a profile of another type) goes to typer's
own conversion unchanged, so its results and error messages stay typer's, but for text that is no number at
all: "'x' is not a whole number" says what to write where pydantic says how it failed to parse.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?")
_NOT_PLAIN = object()


def plain_value(annotation: Any, value: Any) -> Any:
    """`value` converted to `annotation` when the conversion is trivial; _NOT_PLAIN otherwise."""
    kind = type(value)
    if annotation is str and kind is str:
        return value
    if annotation is int:
        if kind is int:
            return value
        if kind is str and _INT.fullmatch(value):
            return int(value)
    if annotation is float:
        if kind in (float, int):
            return float(value)
        if kind is str and _FLOAT.fullmatch(value):
            return float(value)
    if annotation == list[str] and kind in (list, tuple) and all(type(item) is str for item in value):
        return list(value)
    return _NOT_PLAIN


def not_a_number(annotation: Any, value: Any) -> str | None:
    """What a text `value` for a number option is not ("a whole number"), when it is no number at all:
    pydantic's own words ("Input should be a valid integer, unable to parse string...") name no fix."""
    convert, noun = _NUMBER_NOUNS.get(annotation, (None, None))
    if convert is None or type(value) is not str:
        return None
    try:
        convert(value)
    except ValueError:
        return noun
    return None  # a number out of an option's bounds, say: typer's message says which


_NUMBER_NOUNS: dict[Any, tuple[Any, str]] = {int: (int, "a whole number"), float: (float, "a number")}


def install(command: Any, ctx: Any) -> None:
    """Give every typer option of `command` and its subcommands (their --help too: `ctx` names it) the
    conversion above, typer's own for the rest. Nothing happens with a typer that converts otherwise."""
    plain_first = _plain_first_class()
    if plain_first is None:
        return
    from typer.core import _TyperParameter

    def walk(node: Any) -> None:
        for param in (*node.params, node.get_help_option(ctx)):
            if isinstance(param, _TyperParameter) and getattr(param, "_runtime_param", False) is None:
                descriptor = param.type_descriptor
                param._runtime_param = plain_first(parameter_info=descriptor.parameter_info,
                                                   annotation=descriptor.annotation, descriptor=descriptor)
        for child in getattr(node, "commands", {}).values():
            walk(child)

    walk(command)


@functools.cache
def _plain_first_class() -> Any:
    try:
        from typer._click.exceptions import BadParameter
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer._param_types import coerce_cli_path
        from typer.core import _TyperParameter  # noqa: F401  # install() needs it too
    except ImportError:
        return None

    @dataclass(frozen=True)
    class PlainFirst(RuntimeParam):  # type: ignore[misc]  # typer's private base
        descriptor: Any

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            info, descriptor = self.parameter_info, self.descriptor
            # Bounds (min/max), choices and custom parsers are typer's to check, always.
            if not (descriptor.is_ranged or descriptor.is_choice or info.parser is not None):
                plain = plain_value(self.annotation, value)
                if plain is not _NOT_PLAIN:
                    return plain
            if (self.annotation is Path and info.path_type in (None, Path) and type(value) is str and value
                    and descriptor.is_path and not descriptor.is_file and info.parser is None):
                # typer's own path checks (exists, dir_okay...), on the Path pydantic would have made
                return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
            try:
                return build_runtime_param(descriptor)._coerce_value(value, param=param, ctx=ctx)
            except BadParameter:
                noun = not_a_number(self.annotation, value)
                if noun is None:
                    raise
                raise BadParameter(f"{value!r} is not {noun}", ctx=ctx, param=param) from None

    return PlainFirst
