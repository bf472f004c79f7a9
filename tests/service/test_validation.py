import pytest

from service.errors import InvalidProblem
from service.validation import MAX_TEXT_CHARS, validate_problem

MAX_DIGITS = 10


@pytest.mark.parametrize(
    "problem",
    [
        "0+0=",
        "7669+10132=",
        "9999999999+9999999999=",
        "0000000000+0000000001=",  # leading zeros within max_digits
        "1+9999999999=",
    ],
)
def test_accepts_problems_the_model_was_trained_on(problem):
    assert validate_problem(problem, MAX_DIGITS) == problem


@pytest.mark.parametrize(
    "problem, reason",
    [
        ("", "empty"),
        ("12+ab=", "letter 'a' at position 3"),
        ("-12+3=", "operator '-'"),
        ("12+-3=", "operator '-'"),
        ("12*3=", "operator '*'"),
        ("12 + 3=", "whitespace (U+0020) at position 2"),
        ("12+3=\n", "whitespace (U+000A) at position 5"),
        ("1\t+2=", "whitespace"),
        ("1٣+2=", "'٣' (U+0663, ARABIC-INDIC DIGIT THREE) at position 1 is not an ASCII digit"),
        ("３+4=", "U+FF13, FULLWIDTH DIGIT THREE) at position 0 is not an ASCII digit"),
        ("²+1=", "is not an ASCII digit"),  # str.isdigit() is True for superscripts too
        ("1.5+2=", "unexpected character '.'"),
        ("12345678901+1=", "first operand has 11 digits; this model takes at most 10"),
        ("1+12345678901=", "second operand has 11 digits"),
        ("12+34", "missing '='"),
        ("1234=", "missing '+'"),
        ("1+2+3=", "more than one '+'"),
        ("1+2==", "more than one '='"),
        ("1=2+3", "unexpected '2+3' after '='"),
        ("12+34=46", "unexpected '46' after '='"),
        ("+34=", "first operand is empty"),
        ("34+=", "second operand is empty"),
        ("+=", "first operand is empty"),
        ("=", "missing '+'"),
    ],
)
def test_refuses_with_a_message_that_says_what_is_wrong(problem, reason):
    with pytest.raises(InvalidProblem, match="invalid problem") as refused:
        validate_problem(problem, MAX_DIGITS)
    assert reason in str(refused.value)


def test_digit_limit_follows_the_model():
    assert validate_problem("12345+1=", max_digits=5)
    with pytest.raises(InvalidProblem, match="at most 4"):
        validate_problem("12345+1=", max_digits=4)


def test_huge_text_is_refused_without_echoing_it():
    with pytest.raises(InvalidProblem, match="too long") as refused:
        validate_problem("1" * (MAX_TEXT_CHARS + 1), MAX_DIGITS)
    assert len(str(refused.value)) < 200
