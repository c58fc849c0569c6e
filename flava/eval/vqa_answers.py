"""VQA answers as the official VQA evaluation scores them (Antol et al. 2015; the VQA API's ``vqaEval.py``).

:func:`normalize_answer` is the evaluation's answer processing: whitespace, then punctuation (removed where it
touches a space or where the answer holds a digit-comma-digit number such as ``1,000``, else a space; periods not
followed by a digit removed), then per word: lower-cased, number words ``zero``..``ten`` (and ``none``) to digits,
articles dropped, apostrophe-less contractions (``dont``) given their apostrophe.

:func:`vqa_accuracy` is the official accuracy of one answer against the humans' answers: for each human answer
left out in turn, ``min(1, #other humans who gave the answer / 3)``, averaged over the humans. With ten humans an
answer given by 1, 2, 3 or 4+ of them scores 0.3, 0.6, 0.9 and 1.
"""
from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from typing import Sequence

# An answer matched by this many of the other annotators scores 1.
VQA_FULL_CREDIT = 3

# Removed outright where they touch a space (or the answer holds a 1,000-style number), else replaced by a space.
# The apostrophe is not among them: contractions keep it.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # "2.5" keeps its period, "dog." and "a.m." lose theirs
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The contractions the evaluation restores, written with their apostrophes; the lookup maps every spelling with some
# of the apostrophes dropped ("dont", "couldnt've", "couldntve") to the full form. Its table's capitalised keys
# ("Im", "Ive") never match the lower-cased words, so "im" and "ive" are left alone here too; forms whose
# apostrophe-less spelling is a word of its own ("we'll", "we're", "she'd", "let's") are not in it.
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've",
)


def _apostrophe_drops(form: str) -> list[str]:
    """Every spelling of ``form`` with one or more of its apostrophes left out."""
    at = [i for i, ch in enumerate(form) if ch == "'"]
    out = []
    for k in range(1, len(at) + 1):
        for dropped in combinations(at, k):
            out.append("".join(ch for i, ch in enumerate(form) if i not in dropped))
    return out


_CONTRACTIONS = {spelling: form for form in _CONTRACTED for spelling in _apostrophe_drops(form)}


def _strip_punctuation(text: str) -> str:
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or remove_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _fix_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official evaluation's processing of an answer: ``"Two dogs."`` -> ``"2 dogs"``, ``"a dog"`` ->
    ``"dog"``, ``"1,000"`` -> ``"1000"``, ``"black-and-white"`` -> ``"black and white"``, ``"dont"`` -> ``"don't"``.
    Applying it twice changes nothing."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _fix_words(_strip_punctuation(text))


def vqa_accuracy(matches: int, humans: int) -> float:
    """The official accuracy of an answer that ``matches`` of the ``humans`` annotators gave: the mean over the
    humans of ``min(1, matches among the others / 3)`` (a human who gave it leaves ``matches - 1`` others)."""
    if humans < 1 or not 0 <= matches <= humans:
        raise ValueError(f"VQA accuracy needs 0 <= matches <= humans and humans >= 1; got {matches} of {humans}")
    gave = matches * min(1.0, (matches - 1) / VQA_FULL_CREDIT) if matches else 0.0
    others = (humans - matches) * min(1.0, matches / VQA_FULL_CREDIT)
    return (gave + others) / humans


def answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """The humans' answers -> ``{normalised answer: official accuracy}`` for every answer any of them gave; any other
    answer scores 0. The humans' answers go through the same processing as the predicted one (the released
    annotations are already processed, so on them this agrees with the official script, which processes only their
    punctuation)."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    counts = Counter(normalize_answer(a) for a in human_answers)
    return {a: vqa_accuracy(c, len(human_answers)) for a, c in counts.items()}
