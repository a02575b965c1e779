"""Reply text -> speakable chunks: the sentence chunker and the markdown/code/symbol cleaner (pure logic)."""

import random

import pytest

from agents.voice.chunker import SentenceChunker, split_sentences
from agents.voice.speech_text import CODE_PHRASE, to_speech

REPLY = """Sure! Pi is about 3.14, and e.g. Mr. Smith uses it daily. Here's how you read a file in Python, which is simple enough for a beginner: use the open function.

1. Open the file with `open("data.txt")`.
2. Read it. Then close it.

```python
with open("a.txt") as f:
    print(f.read())  # prints it. Then done? No.
```
That's it! Does that help?"""

EXPECTED = [
    "Sure!",
    "Pi is about 3.14, and e.g. Mr. Smith uses it daily.",
    "Here's how you read a file in Python,",
    "which is simple enough for a beginner: use the open function.",
    '1. Open the file with `open("data.txt")`.',
    "2. Read it.",
    "Then close it.",
    '```python\nwith open("a.txt") as f:\n    print(f.read())  # prints it. Then done? No.\n```',
    "That's it!",
    "Does that help?",
]


def stream(text, sizes, clause_words=8, phrase_chars=None):
    chunker, out, i = SentenceChunker(clause_words, phrase_chars=phrase_chars), [], 0
    while i < len(text):
        n = sizes()
        out += chunker.feed(text[i : i + n])
        i += n
    return out + chunker.flush()


def test_chunker_splits_a_reply_at_sentences_clauses_and_code_blocks():
    assert stream(REPLY, lambda: len(REPLY)) == EXPECTED


@pytest.mark.parametrize("seed", range(5))
def test_chunker_gives_the_same_chunks_for_any_delta_sizes(seed):
    rng = random.Random(seed)
    assert stream(REPLY, lambda: rng.randint(1, 7)) == EXPECTED


def test_chunker_emits_a_sentence_as_soon_as_the_next_character_confirms_it():
    chunker = SentenceChunker()
    assert chunker.feed("Hello there.") == []  # could still be "there.com" or "3.14"
    assert chunker.feed(" How") == ["Hello there."]
    assert chunker.feed(" are you") == []
    assert chunker.flush() == ["How are you"]
    assert chunker.flush() == []


@pytest.mark.parametrize(
    "text",
    [
        "The value is 3.14 and it is stable",
        "Open main.py and config.json first",
        "Ask Dr. Jones or Prof. Lee about it",
        "Use a list, i.e. a mutable sequence",
        "Read J. R. R. Tolkien tonight",
        "Compare a vs. b carefully",
        "Check `x.y()? z.` here",
    ],
)
def test_no_sentence_end_inside_numbers_names_abbreviations_or_code(text):
    assert split_sentences(text + ". Next one.") == [text + ".", "Next one."]


def test_clause_split_only_after_enough_words():
    short = "Yes, it works, mostly."
    assert stream(short, lambda: 1, clause_words=4) == [short]
    long = "When you start the server on a fresh machine, it loads the models once; later starts are quick."
    assert stream(long, lambda: 3, clause_words=4) == [
        "When you start the server on a fresh machine,",
        "it loads the models once;",
        "later starts are quick.",
    ]
    assert split_sentences(long) == [long]  # clause_words=None: sentences only


def test_phrase_split_before_a_conjunction_or_preposition_only_after_enough_words_and_outside_code():
    long = "Water boils at 100 degrees Celsius and salt melts at 801 degrees."
    assert stream(long, lambda: 1, phrase_chars=16) == ["Water boils at 100 degrees Celsius",
                                                        "and salt melts at 801 degrees."]
    assert stream(long, lambda: 1, phrase_chars=40) == ["Water boils at 100 degrees Celsius and salt melts",
                                                        "at 801 degrees."]
    assert stream(long, lambda: 1, phrase_chars=50) == [long]  # the last "at" comes after 49 characters
    assert stream(long, lambda: 1) == [long]  # off by default
    # a long word counts for what it takes to say
    assert stream("H-D-T-T-P stands for hypertext transfer protocol.", lambda: 3, phrase_chars=16) == [
        "H-D-T-T-P stands", "for hypertext transfer protocol."]
    # whole words only ("android", "orange"), never inside inline code
    text = "Install the app on your android phone or tablet: `if a and b or c` works."
    assert stream(text, lambda: 2, phrase_chars=16, clause_words=None) == [
        "Install the app on your android phone", "or tablet: `if a and b or c` works."]


def test_unclosed_code_fence_is_held_until_flush_and_run_ons_are_cut():
    chunker = SentenceChunker()
    assert chunker.feed("Here it is:\n```js\nconsole.log(1). More.\n") == ["Here it is:"]
    assert chunker.flush() == ["```js\nconsole.log(1). More."]
    words = " ".join(["word"] * 100)
    chunks = SentenceChunker(max_chars=120).feed(words)
    assert chunks and all(len(c) <= 120 for c in chunks)


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("## Getting started", "Getting started"),
        ("**Sure!** Here's a *quick* example 😀🚀 of it.", "Sure! Here's a quick example of it."),
        ('```python\nwith open("a.txt") as f:\n    print(f.read())\n```', CODE_PHRASE),
        ("Here:\n```js\nconsole.log(1)", "Here: " + CODE_PHRASE),
        ("- Install it with `pip install requests`\n- Call `requests.get()`",
         "Install it with pip install requests. Call requests dot get"),
        ("1. First item\n2. Second item", "First item. Second item"),
        ("See [the docs](https://docs.python.org/3/library) or https://www.example.com/path?q=1. Next",
         "See the docs or example dot com. Next"),
        ("If x == 5 and y != 3, then x -> y; 50% of #3 costs $5 at ~10 am.",
         "If x equals 5 and y is not equal to 3, then x to y; 50 percent of number 3 costs 5 dollars at about 10 am."),
        ("Use `my_variable_name` and snake_case and/or camelCase.",
         "Use my variable name and snake case and or camelCase."),
        ("| Name | Age |\n|---|---|\n| Bob | 42 |", "Name, Age. Bob, 42"),
        ("> quoted text\n---\nDone.", "quoted text. Done."),
        ("Try `sorted(items, key=lambda item: item.priority, reverse=True)` here.", f"Try {CODE_PHRASE} here."),
        ("Set my_var_name to 2*3, **not** 5.", "Set my var name to 2 times 3, not 5."),
        ("👍", ""),
    ],
)
def test_speech_text(raw, spoken):
    assert to_speech(raw) == spoken


def test_code_in_a_reply_is_never_spoken():
    spoken = " ".join(to_speech(chunk) for chunk in EXPECTED)
    assert "print" not in spoken and "a.txt" not in spoken and CODE_PHRASE in spoken
    assert not set(spoken) & set("`*#_[]{}|<>\\")


def test_a_transcript_said_again_and_again_is_kept_once():
    from agents.voice.asr import said_once

    again = " What language do they speak in Brazil? What language do they speak in Brazil? What language"
    assert said_once(again) == "What language do they speak in Brazil?"
    assert said_once("Hi. How are you? Hi. How are you? Hi.") == "Hi. How are you?"
    assert said_once("What language do they speak in Brazil?") is None  # said once: not a repeat
    assert said_once("la la la la la la la la") is None  # no sentence to keep: the full window decides
