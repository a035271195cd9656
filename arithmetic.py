"""Arithmetic captchas: the reading is an expression as drawn (`3+5=?`, `12×4=`, `７－２＝？`, `三加五等于`), the
answer is its value.

    arithmetic.answer("12×4=?")   # Answer(expression='12*4', value='48', error=None)
    arithmetic.answer("8÷0=")     # Answer(expression='8/0', value=None, error='division by zero')

The reading is normalised (full-width forms, `×` `x` `X` for times, `÷` for divide, Chinese digits and 加 减 乘 除,
a trailing `=`, `=?` or 等于), checked to hold only numbers, the four operators and brackets, then parsed by
Python's `ast` and computed from a whitelist of its nodes: no `eval`, no names, no powers. A reading that is not
such an expression, is over MAX_LENGTH characters, or divides by zero gets no value and says why. Division gives
an integer when exact, else the quotient to 6 significant digits.
"""

import ast
import operator
import re
import unicodedata
from fractions import Fraction
from typing import NamedTuple

from errors import CaptchaError

ANSWERS = ("text", "arithmetic")  # what a reading answers (--answer): its text, or the value of its expression
MAX_LENGTH = 40  # a drawn expression is a few symbols; longer readings are refused before parsing
MAX_DIGITS = 9  # per number
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
WORDS = {"加": "+", "减": "-", "乘": "*", "除": "/", "乘以": "*", "除以": "/", "×": "*", "÷": "/", "x": "*", "X": "*",
         "−": "-", "–": "-", "—": "-", "·": "*"}
CHINESE_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
                  "九": 9}
TRAILING = re.compile(r"(=|等于)?\s*\?*$")
ALLOWED = re.compile(r"[0-9+\-*/() ]+")
CHINESE_NUMBER = re.compile(r"[零〇一二两三四五六七八九十]+")


def check_answer(mode):
    if mode not in ANSWERS:
        raise CaptchaError(f"unknown --answer {mode!r}; choose from {', '.join(ANSWERS)}")
    return mode


def answer_of(text, mode):
    """The Answer of a reading under `mode` (--answer), or None for plain text."""
    return answer(text) if mode == "arithmetic" else None


class Answer(NamedTuple):
    expression: str  # as computed (normalised), or the reading when it could not be normalised
    value: str | None  # the answer as text, or None
    error: str | None  # why there is no value


def chinese_number(text):
    """零..九 and 十 up to 99: 七 -> 7, 十二 -> 12, 二十 -> 20, 三十五 -> 35."""
    if "十" not in text:
        return "".join(str(CHINESE_DIGITS[c]) for c in text)
    tens, _, units = text.partition("十")
    if len(tens) > 1 or len(units) > 1 or "十" in units:
        raise ValueError(text)
    return str((CHINESE_DIGITS[tens] if tens else 1) * 10 + (CHINESE_DIGITS[units] if units else 0))


def normalise(reading):
    """The reading as an ASCII expression (digits, + - * /, brackets), or ValueError saying what is wrong."""
    text = unicodedata.normalize("NFKC", reading).strip()
    text = TRAILING.sub("", text).strip()
    for word in sorted(WORDS, key=len, reverse=True):
        text = text.replace(word, WORDS[word])
    try:
        text = CHINESE_NUMBER.sub(lambda m: chinese_number(m.group()), text)
    except (KeyError, ValueError):
        raise ValueError("a Chinese number it cannot read") from None
    if not text:
        raise ValueError("no expression")
    if not ALLOWED.fullmatch(text):
        bad = sorted(set(re.sub(r"[0-9+\-*/() ]", "", text)))
        raise ValueError(f"symbols that are not arithmetic: {' '.join(bad)}")
    return re.sub(r"(?<!\d)0+(?=\d)", "", text.replace(" ", ""))  # 05 is 5 (Python refuses leading zeros)


def evaluate(node):
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError("not an expression of numbers and + - × ÷")


def format_value(value):
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


def answer(reading):
    """-> Answer: the normalised expression, its value as text, or the reason there is none."""
    if reading is None or not reading.strip():
        return Answer(reading or "", None, "no expression")
    if len(reading) > MAX_LENGTH:
        return Answer(reading, None, f"{len(reading)} characters; an expression has at most {MAX_LENGTH}")
    try:
        expression = normalise(reading)
    except ValueError as e:
        return Answer(reading, None, str(e))
    if any(len(number) > MAX_DIGITS for number in re.findall(r"\d+", expression)):
        return Answer(expression, None, f"a number over {MAX_DIGITS} digits")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return Answer(expression, None, "does not parse as an expression")
    try:
        return Answer(expression, format_value(evaluate(tree)), None)
    except ZeroDivisionError:
        return Answer(expression, None, "division by zero")
    except ValueError as e:
        return Answer(expression, None, str(e))
