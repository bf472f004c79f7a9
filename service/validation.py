"""The one check a problem passes before it reaches the model.

A problem is ``a+b=``: two operands of 1 to ``max_digits`` ASCII digits (leading
zeros allowed), one '+' between them and one '=' at the end, nothing else. Each
failure says what is wrong, so a client can fix its input without reading code.
"""

from __future__ import annotations

import unicodedata

from service.errors import InvalidProblem

# NOTE: a hard cap before scanning, so a multi-megabyte string is refused in O(1).
MAX_TEXT_CHARS = 1024

DIGITS = frozenset("0123456789")
OPERATORS = frozenset("-*/×÷^%")
EXAMPLE = "e.g. 7669+10132="


def validate_problem(text: str, max_digits: int) -> str:
    """-> ``text`` unchanged if the model can solve it; raises InvalidProblem otherwise."""
    if not text:
        raise _invalid(text, f"the problem is empty; expected a+b= with ASCII digits, {EXAMPLE}")
    if len(text) > MAX_TEXT_CHARS:
        raise _invalid(text, f"{len(text)} characters is too long for a problem")

    # every character: an ASCII digit, '+' or '='
    for pos, char in enumerate(text):
        if char not in DIGITS and char not in "+=":
            raise _invalid(text, _describe(char, pos))

    # exactly one '+' and one '=', the '=' last
    if "=" not in text:
        raise _invalid(text, "missing '=' at the end")
    if text.count("=") > 1:
        raise _invalid(text, "more than one '='")
    if not text.endswith("="):
        tail = text[text.index("=") + 1 :]
        raise _invalid(text, f"unexpected {tail!r} after '='; the problem ends with '='")
    if "+" not in text:
        raise _invalid(text, "missing '+' between the operands")
    if text.count("+") > 1:
        raise _invalid(text, "more than one '+'; only two operands are supported")

    # two operands of 1..max_digits digits
    first, second = text[:-1].split("+")
    for name, operand in (("first", first), ("second", second)):
        if not operand:
            raise _invalid(text, f"the {name} operand is empty")
        if len(operand) > max_digits:
            raise _invalid(
                text,
                f"the {name} operand has {len(operand)} digits; "
                f"this model takes at most {max_digits}",
            )
    return text


def _describe(char: str, pos: int) -> str:
    """What is wrong with a character that is neither an ASCII digit, '+' nor '='."""
    code = f"U+{ord(char):04X}"
    if char.isspace():
        return f"whitespace ({code}) at position {pos}; write the problem without spaces"
    if unicodedata.category(char) == "Nd" or char.isdigit():
        # e.g. Arabic-Indic or fullwidth digits: str.isdigit() says yes, the model says no
        name = unicodedata.name(char, "a digit")
        return f"{char!r} ({code}, {name}) at position {pos} is not an ASCII digit 0-9"
    if char in OPERATORS:
        return (
            f"operator {char!r} at position {pos}; "
            "only addition of non-negative integers is supported"
        )
    if char.isalpha():
        return f"letter {char!r} at position {pos}; operands are written in ASCII digits 0-9"
    return f"unexpected character {char!r} ({code}) at position {pos}; expected a+b=, {EXAMPLE}"


def _invalid(text: str, reason: str) -> InvalidProblem:
    shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
    return InvalidProblem(f"invalid problem {shown}: {reason}")
