"""Layer-name patterns users type (FP8LayerwiseCast's skip_pattern): globs with a bounded matcher.

A regular expression from a user ran Python's backtracking engine for minutes on one layer name
(nested quantifiers) and held the whole server (issue 11). Globs cannot run away: the matcher
below is the two-pointer wildcard algorithm, O(len(pattern) * len(name)) in the worst case, and
both lengths are capped.

Language: `*` any run of characters (dots included), `?` one character, everything else literal;
only letters, digits, `_ - . * ?` are accepted. A pattern matches a layer when it matches its whole
dotted name or any run of consecutive parts of it: `final_layer` matches `final_layer.linear`,
`*norm*` matches `double_blocks.0.img_attn.norm.query_norm`, `double_blocks.1.*` a whole block.
Patterns are separated by newlines or commas (a comma is never part of a glob).
"""
from __future__ import annotations

import re

from ..errors import QuantLoRAError

MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 200
MAX_TEXT_CHARS = 8192
_ALLOWED = re.compile(r"[A-Za-z0-9_.*?-]+")  # fullmatch on short bounded text: no backtracking risk
_REGEX_CHARS = set("^$()|+\\[]{}")


def parse(text: str, what: str, example: str) -> tuple[str, ...]:
    """Split and check; raises QuantLoRAError naming the refused pattern and what to write instead."""
    if len(text) > MAX_TEXT_CHARS:
        raise QuantLoRAError(f"{what}: {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted.")
    parts = tuple(p.strip() for p in text.replace(",", "\n").split("\n") if p.strip())
    if len(parts) > MAX_PATTERNS:
        raise QuantLoRAError(f"{what}: {len(parts)} patterns; at most {MAX_PATTERNS} are accepted.")
    for p in parts:
        if len(p) > MAX_PATTERN_CHARS:
            raise QuantLoRAError(f"{what}: a pattern of {len(p)} characters ({p[:40]!r}...); at most "
                                 f"{MAX_PATTERN_CHARS} are accepted.")
        if not _ALLOWED.fullmatch(p):
            bad = sorted({c for c in p if not _ALLOWED.fullmatch(c)})
            regexy = any(c in _REGEX_CHARS for c in bad)
            raise QuantLoRAError(
                f"{what}: {p!r} uses {' '.join(repr(c) for c in bad)}; layer patterns are globs: `*` any run of "
                "characters, `?` one character, letters, digits, `_ - .` literal, one pattern per line (or "
                f"separated by commas). E.g. {example}."
                + (" Regular expressions are not accepted (one could hold the server for minutes)." if regexy else ""))
    return parts


def glob_match(pattern: str, text: str) -> bool:
    """Whole-string wildcard match in O(len(pattern) * len(text)): on a mismatch only the last `*`
    is retried, one character further (the classic greedy two-pointer algorithm)."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def matches(patterns: tuple[str, ...], name: str) -> bool:
    """True when a pattern matches the dotted name or a run of consecutive parts of it."""
    if not patterns:
        return False
    parts = name.split(".")
    runs = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    return any(glob_match(p, r) for p in patterns for r in runs)
