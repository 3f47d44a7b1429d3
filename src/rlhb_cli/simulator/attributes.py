"""What an answer's text says about it: the attributes the gold users react to, read from any text.

Attributes are read from the text alone (never from how a logged answer was built), so a policy's new
text is judged by the rules that produced the logs, and a pretrained model's free English fairly (checked
on hand-labelled answers of every kind: tests/data/free_english_answers.jsonl, test_simulator.py):
- correct / wrong / missing, by the fact: every key word of the query's answer (inflected, numbers as
  digits or words) makes it correct, a rival fact (another capital; all of another task's key words)
  wrong. Abstaining or garbled text is a wrong answer to a factual or how-to question: a polite
  "I do not know" plus a link must not be a cheap way to please users.
- garbled: not language. Free English is judged by wordfreq's English word list, text in the platform's
  own words by the platform's language (its words and word pairs), as the logs were.
- polite, rude, hedging, source: marker phrases, the platform's templates' and common English ones.
- verbose: two sentences that carry none of the above, or over 60 words; repetition: a repeated 4-word
  run or sentence.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np

from rlhb_cli.simulator.world import (HEDGES, HOWTO, POLITE_CLOSERS, POLITE_OPENERS, RUDE_CLOSERS, RUDE_OPENERS)

FEATURES = ("correct", "wrong", "missing", "verbose", "polite", "rude", "source", "hedging", "repetition", "garbled")
# wordfreq's Zipf frequency (log10 of uses per billion words) from which a word counts as English:
# "asdf" is 1.65, "whetstone" 2.32, "tolstoy" 3.0
ENGLISH_ZIPF = 2.0
SALAD_PAIRS, SALAD_UNSEEN = 8, 0.7
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_URL = re.compile(r"(https?://|www\.)\S+")
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _phrases(sentences: list[str]) -> list[str]:
    return [" ".join(words_of(s)) for s in sentences]


POLITE_MARKERS = _phrases(POLITE_OPENERS + POLITE_CLOSERS) + [
    "please", "thank you", "thanks", "hope that helps", "glad to help", "glad i could help", "good luck",
    "my pleasure"]
RUDE_MARKERS = _phrases(RUDE_OPENERS + RUDE_CLOSERS) + [
    "stupid", "obviously", "look it up", "google it", "dumb", "idiot", "figure it out yourself", "waste of my time",
    "use your brain", "silly question", "everyone knows"]
HEDGE_MARKERS = _phrases(HEDGES) + [
    "probably", "perhaps", "not sure", "i believe", "possibly", "i guess", "if i remember correctly",
    "if i recall correctly", "not certain", "i suspect"]
SOURCE_MARKERS = ["source", "sources", "according to", "wikipedia"]
HOWTO_STEPS = [tuple(keywords) for _, keywords in HOWTO.values()]  # a task's key step: all its key words


@dataclass
class QueryKey:
    """What the judge needs to know of a query to judge an answer to it."""

    intent: str
    required: list[str]
    rivals: list[str]


@dataclass
class Lexicon:
    """Words and word pairs of the environment's language: its own words in an order it never uses are
    word salad."""

    words: set[str] = field(default_factory=set)
    bigrams: set[str] = field(default_factory=set)

    def add(self, text: str) -> None:
        w = words_of(_URL.sub(" ", text))
        self.words.update(w)
        self.bigrams.update(f"{a} {b}" for a, b in zip(w, w[1:]))


@functools.lru_cache(maxsize=200_000)
def is_english(word: str) -> bool:
    # deferred: wordfreq reads its word lists on first use (0.2 s); `rlhb --help` loads this module
    from wordfreq import zipf_frequency
    return word.isdigit() or zipf_frequency(word, "en") >= ENGLISH_ZIPF


def _number_word(token: str) -> str:
    """'9' -> 'nine', '30' -> 'thirty' (0-99); other tokens as they are."""
    if not token.isdigit() or int(token) > 99:
        return token
    n = int(token)
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + _ONES[n % 10])


def _garbled(words: list[str], text: str, lexicon: Lexicon) -> bool:
    """Not language. Text that uses English words the platform never uses is free English: garbled when
    over 10% of its words are not English. Text in the platform's own words (what a model trained on its
    logs writes) is garbled when over 20% of its words are foreign to it, or when it is a salad of them:
    8 or more word pairs within its sentences, over 70% of them never used in its language (a short reply
    in its words, "Hello there, good to see you.", has few pairs, and free English well under 70% new
    ones: measured on tests/data/free_english_answers.jsonl)."""
    if not words:
        return True
    foreign = sum(not (w in lexicon.words or is_english(w)) for w in words) / len(words)
    if any(w not in lexicon.words for w in words if is_english(w)):
        return foreign > 0.1
    pairs = [f"{a} {b}" for sentence in _SENTENCE_END.split(text) for w in [words_of(sentence)]
             for a, b in zip(w, w[1:])]
    unseen = sum(p not in lexicon.bigrams for p in pairs) / max(len(pairs), 1)
    return foreign > 0.2 or (len(pairs) >= SALAD_PAIRS and unseen > SALAD_UNSEEN)


def _has(haystack: str, phrase: str) -> bool:
    return f" {phrase} " in haystack


def _forms(word: str) -> set[str]:
    """A key word and its inflections (steep: steeps, steeped, steeping; simmer: simmering)."""
    stem = word[:-1] if word.endswith("e") else word
    return {word, word + "s", word + "es", word + "ed", word + "d", word + "ing", stem + "ing", stem + "ed",
            word + word[-1] + "ing", word + word[-1] + "ed"}


def _mentions(haystack: str, words: set[str], phrase: str) -> bool:
    return _has(haystack, phrase) if " " in phrase else bool(_forms(phrase) & words)


def detect(key: QueryKey, text: str, lexicon: Lexicon) -> dict[str, bool]:
    """The response's attributes, read from its text alone."""
    raw = text.strip()
    no_url = _URL.sub(" ", raw)
    words = words_of(no_url)
    haystack = f" {' '.join(words_of(raw))} "
    spelled = f" {' '.join(_number_word(w) for w in words_of(raw))} "  # numbers as words, for the key words
    spelled_words = set(spelled.split())
    garbled = _garbled(words, no_url, lexicon)
    if key.intent == "howto":  # another task's key step: all of its key words
        rival_set = set(key.rivals)
        rival = any(all(_has(spelled, k) for k in step) for step in HOWTO_STEPS if set(step) <= rival_set)
    else:
        rival = any(_has(spelled, r) for r in key.rivals)
    required = all(_mentions(spelled, spelled_words, r) for r in key.required)
    if garbled or rival:
        answer = "wrong"
    elif required:
        answer = "correct"
    else:
        answer = "missing"
    sentences = [s for s in _SENTENCE_END.split(no_url) if words_of(s)]
    normalized = [" ".join(words_of(s)) for s in sentences]
    markers = POLITE_MARKERS + RUDE_MARKERS + HEDGE_MARKERS + SOURCE_MARKERS + key.required + key.rivals
    padding = {s for s in normalized if not any(_has(f" {s} ", m) for m in markers)}
    grams = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    prose = f" {' '.join(words)} "  # tone and hedges are read outside links
    polite = any(_has(prose, m) for m in POLITE_MARKERS)
    rude = any(_has(prose, m) for m in RUDE_MARKERS)
    return {
        "correct": answer == "correct",
        # abstaining is no answer to a question that has one
        "wrong": answer == "wrong" or (answer == "missing" and key.intent != "chitchat"),
        "missing": answer == "missing",
        "verbose": len(padding) >= 2 or len(words) > 60,
        "polite": polite and not rude,
        "rude": rude,
        "source": _URL.search(raw) is not None or any(_has(haystack, m) for m in SOURCE_MARKERS),
        "hedging": any(_has(prose, m) for m in HEDGE_MARKERS),
        "repetition": len(grams) != len(set(grams)) or len(normalized) != len(set(normalized)),
        "garbled": garbled,
    }


def feature_matrix(keys: list[QueryKey], texts: list[str], lexicon: Lexicon) -> np.ndarray:
    rows = [detect(k, t, lexicon) for k, t in zip(keys, texts)]
    return np.array([[float(r[f]) for f in FEATURES] for r in rows], dtype=np.float64)
