"""A workaround for xgrammar's length-bounded JSON strings (mlc-ai/xgrammar#800, open in
0.2.9): a string schema with ``minLength``/``maxLength`` compiles to a repetition of
``[^"\\\r\n]``, which admits raw control characters (a tab, ``\x0f``: JSON that
``json.loads`` refuses). The grammar's EBNF is rewritten so each repeated character is a
code point JSON allows unescaped, then compiled as EBNF. Escapes stay out of bounded
strings, as in xgrammar itself: a repeated rule with an escape alternative makes
xgrammar's token masks ~200x slower (milliseconds per step at a 32k vocabulary). Versions
that fix the bug print another rule body, which is left alone."""

from __future__ import annotations

import re

import xgrammar as xgr

# Only specs that mention a length bound can have the faulty rule.
LENGTH_KEYS = ('"minLength"', '"maxLength"')
_FAULTY_RULE = re.compile(r'^(\w+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
_JSON_CHARACTER = r"(([^\0-\x1f\"\\]))"


def mentions_length(value: str) -> bool:
    return any(key in value for key in LENGTH_KEYS)


def fixed_ebnf(grammar: xgr.Grammar) -> str | None:
    """``grammar``'s EBNF with its bounded-string characters made valid JSON; None when it
    has no faulty rule."""
    fixed, count = _FAULTY_RULE.subn(lambda m: f"{m.group(1)} ::= {_JSON_CHARACTER}", str(grammar))
    return fixed if count else None
