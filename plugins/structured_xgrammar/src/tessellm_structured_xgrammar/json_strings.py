"""A workaround for xgrammar's length-bounded JSON strings (mlc-ai/xgrammar#800, open in
0.2.9): a string schema with ``minLength``/``maxLength`` compiles to a repetition of
``[^"\\\r\n]``, which admits raw control characters (a tab, ``\x0f``: JSON that
``json.loads`` refuses) and no escapes. The grammar's EBNF is rewritten so each repeated
character is an unescaped non-control code point or one escape, then compiled as EBNF.
Versions that fix the bug print another rule body, which is left alone."""

from __future__ import annotations

import re

import xgrammar as xgr

# Only specs that mention a length bound can have the faulty rule.
LENGTH_KEYS = ('"minLength"', '"maxLength"')
_FAULTY_RULE = re.compile(r'^(\w+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
ESCAPE_RULE = "tessellm_bounded_escape"
# No high surrogates: a \uD8xx-\uDBxx pair decodes to one character but would count as
# two repetitions, letting a string under minLength through.
_HEX = "[0-9a-fA-F]"
_ESCAPE = (
    f'{ESCAPE_RULE} ::= [\\"\\\\/bfnrt] | "u" [0-9a-cA-Ce-fE-F] {_HEX} {_HEX} {_HEX} '
    f'| "u" [dD] [0-7] {_HEX} {_HEX} | "u" [dD] [c-fC-F] {_HEX} {_HEX}'
)


def mentions_length(value: str) -> bool:
    return any(key in value for key in LENGTH_KEYS)


def fixed_ebnf(grammar: xgr.Grammar) -> str | None:
    """``grammar``'s EBNF with its bounded-string characters made valid JSON; None when it
    has no faulty rule."""
    text = str(grammar)
    fixed, count = _FAULTY_RULE.subn(
        lambda m: f'{m.group(1)} ::= (([^\\0-\\x1f\\"\\\\]) | ("\\\\" {ESCAPE_RULE}))', text
    )
    if count == 0:
        return None
    return f"{fixed}\n{_ESCAPE}\n"
