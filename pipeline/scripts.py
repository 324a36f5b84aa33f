"""Lua scripts whose keys and arguments are named, not numbered.

A script's source says ``$name`` for each of its keys and arguments, and for each constant it
is built with (a counter's name, say). :class:`Signature` turns each name into ``KEYS[i]``,
``ARGV[j]`` or the constant's Lua literal when the script is built, and builds each call's
KEYS and ARGV from mappings of the same names. So a part that brings keys and arguments of
its own (the rate limit's, the idempotency record's) cannot shift another part's, and a name
the source uses but the signature lacks fails when the script is built, not at a call.

After the named ones, a call may pass a tail of keys and arguments of any length (one queue
key and one job per job): in the source, ``$named_keys`` and ``$named_args`` are how many
named ones come before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from string import Template
from typing import Any, Final

#: What a constant given to a script may hold: it becomes a Lua literal as it is.
_CONSTANT_RE: Final = re.compile(r"[A-Za-z0-9_.:-]*")


@dataclass(frozen=True, slots=True)
class Signature:
    """The names of a script's keys and of its arguments, in the order Redis gets them."""

    keys: tuple[str, ...]
    args: tuple[str, ...]
    # What pick the named values out of a call's mappings, in order (a call is on the path
    # of every signup: this is a C loop, not a Python one).
    _pick_keys: Callable[[Mapping[str, Any]], Any] = field(init=False, repr=False, compare=False)
    _pick_args: Callable[[Mapping[str, Any]], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [*self.keys, *self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"a name is used twice in {names}")
        object.__setattr__(self, "_pick_keys", _picker(self.keys))
        object.__setattr__(self, "_pick_args", _picker(self.args))

    def __add__(self, other: Signature) -> Signature:
        """This signature's keys and arguments, then ``other``'s: a script made of parts."""
        return Signature(self.keys + other.keys, self.args + other.args)

    def source(self, template: str, **constants: str | int) -> str:
        """``template`` with every ``$name`` replaced: a key by ``KEYS[i]``, an argument by
        ``ARGV[j]``, a constant by its Lua literal, ``$named_keys`` and ``$named_args`` by
        how many of each the signature names. A name none of these gives raises KeyError."""
        names: dict[str, str] = {"named_keys": str(len(self.keys))}
        names["named_args"] = str(len(self.args))
        names.update((name, f"KEYS[{i}]") for i, name in enumerate(self.keys, 1))
        names.update((name, f"ARGV[{i}]") for i, name in enumerate(self.args, 1))
        for name, value in constants.items():
            if name in names:
                raise ValueError(f"constant {name!r} is also a key or an argument")
            if isinstance(value, int):
                names[name] = str(value)
            elif _CONSTANT_RE.fullmatch(value):
                names[name] = f"'{value}'"
            else:
                raise ValueError(f"constant {name}={value!r} is not a plain word")
        return Template(template).substitute(names)

    def call(
        self,
        keys: Mapping[str, Any],
        args: Mapping[str, Any],
        tail_keys: Sequence[Any] = (),
        tail_args: Sequence[Any] = (),
    ) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of one call: the named ones in the signature's order (a name missing
        from ``keys`` or ``args`` raises KeyError), then the tails."""
        return [*self._pick_keys(keys), *tail_keys], [*self._pick_args(args), *tail_args]


def _picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The values of ``names`` in a mapping, as a tuple (itemgetter's, whatever the count)."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        get = itemgetter(names[0])
        return lambda mapping: (get(mapping),)
    return itemgetter(*names)
