"""Templated key maps for weight conversion.

A key map is a list of ``(source_template, target_template)`` pairs where ``{}`` stands for a
layer index, e.g. ``("blocks.{}.attn.qkv.weight", "encoder.blocks.{}.attn.qkv.weight")``.
A target of ``None`` drops the key on purpose. Any source key that no rule matches, and any
target key the destination expects but does not receive, is an error naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from data2vec.errors import UserError

KeyMap = list[tuple[str, str | None]]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def rename(state: Mapping[str, Tensor], keymap: KeyMap) -> dict[str, Tensor]:
    """Rename every key of ``state`` by the first matching rule; unmatched keys raise."""
    compiled = [(_pattern(src), dst) for src, dst in keymap]
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for pattern, dst in compiled:
            match = pattern.match(key)
            if match is None:
                continue
            if dst is not None:
                out[dst.format(*match.groups())] = value
            break
        else:
            unmatched.append(key)
    if unmatched:
        raise UserError(f"unexpected keys with no conversion rule: {sorted(unmatched)}")
    return out


def check_complete(converted: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise when the converted keys and the destination's keys differ."""
    converted, expected = set(converted), set(expected)
    missing, unused = sorted(expected - converted), sorted(converted - expected)
    if missing or unused:
        raise UserError(f"{what}: missing keys {missing}; unused keys {unused}")
