import dataclasses
import random

import pytest

from data_pipelines.scrub.filters.quality import (
    QualityFilter,
    Words,
    c4_clean,
    dup_ngram_char_frac,
    top_ngram_char_frac,
)
from pretrain.config import QualityConfig

PROSE = ("The history of the river valley is long and varied. Farmers settled there with their families "
         "and built small villages that grew into towns. Trade with the coast brought new ideas, tools and "
         "crops to the region. Scholars have studied the old records to understand how people lived. ")


def qf(**kw) -> QualityFilter:
    return QualityFilter(dataclasses.replace(QualityConfig(c4_lines=False), **kw))


def words_text(n: int) -> str:
    base = "the cat sat with a dog and that mat of wool to have fun".split()
    return " ".join(base[i % len(base)] + str(i // len(base)) for i in range(n))


def naive_dup_frac(words: list[str], n: int) -> float:
    """Reference: characters of words covered by non-first occurrences of n-grams."""
    seen, covered = set(), set()
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            covered.update(range(i, i + n))
        seen.add(g)
    total = sum(map(len, words))
    return sum(len(words[i]) for i in covered) / total if total else 0.0


def test_min_words_boundary():
    f = qf(repetition=False, min_stop_words=0)
    fifty = " ".join(f"word{i}x" for i in range(50))
    forty_nine = " ".join(f"word{i}x" for i in range(49))
    assert f.apply(fifty)[1] is None
    assert f.apply(forty_nine)[1] == "min_words"
    symbols_only_extra = forty_nine + " -- ## !!"
    assert f.apply(symbols_only_extra)[1] == "min_words"  # punctuation tokens do not count


def test_gopher_quality_rules():
    f = qf(repetition=False)
    good = PROSE * 2
    assert f.apply(good)[1] is None
    assert f.apply(" ".join(["a"] * 60) + " the and")[1] == "mean_word_len"
    assert f.apply(" ".join(["extraordinarily"] * 60) + " the and")[1] == "mean_word_len"
    assert f.apply(good + " #tag" * 12)[1] == "hash_word_ratio"
    assert f.apply(good + " and so on... yes." * 20)[1] == "ellipsis_word_ratio"
    bullets = "\n".join(f"- item number {i} of the list with that and" for i in range(20))
    assert f.apply(bullets)[1] == "bullet_lines"
    ell = "\n".join(f"{PROSE}" if i % 2 else f"line {i} goes on and on with the story of that..." for i in range(6))
    assert f.apply(ell)[1] == "ellipsis_lines"
    numbers = " ".join(str(i) for i in range(80)) + " " + PROSE
    assert f.apply(numbers)[1] == "alpha_words"
    no_stop = " ".join(f"river{i} valley mountain" for i in range(30))
    assert f.apply(no_stop)[1] == "stop_words"


def test_repetition_rules():
    f = qf()
    assert f.apply(PROSE * 2)[1] is not None  # the same paragraph text twice in one line: n-gram rules
    para = PROSE.strip()
    doubled = f"{para}\n\n{para}\n\n{para} Something new and different follows here at the end."
    assert f.apply(doubled)[1] == "dup_para_frac"
    lines = [f"Line {i} has its own words: {w}." for i, w in enumerate(words_text(40).split())]
    dup_lines = "\n".join(lines[:20] + lines[:10])  # 10 of 30 lines repeat = 0.33 > 0.30
    assert f.apply(dup_lines)[1] == "dup_line_frac"
    long_line = " ".join(f"word{j}" for j in range(60)) + "."
    few_long = "\n".join([f"alpha{i} beta{i} gamma{i}." for i in range(9)] + [long_line, long_line])
    # 1 of 11 lines repeats (0.09 <= 0.30) but it holds ~45% of the characters (> 0.20)
    assert f.apply(few_long)[1] == "dup_line_char_frac"
    assert qf(max_dup_line_char_frac=0.5).apply(few_long)[1] == "dup_5gram_char_frac"
    top = " ".join(["ice cream"] * 30 + words_text(60).split())
    assert f.apply(top)[1] == "top_2gram_char_frac"


def test_ngram_fractions_match_reference():
    rng = random.Random(0)
    vocab = ["a", "bb", "ccc", "the", "and", "river", "z"]
    for _ in range(30):
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 80))]
        w = Words.of(" ".join(words))
        for n in (5, 6, 7):
            assert dup_ngram_char_frac(w, n) == pytest.approx(naive_dup_frac(words, n))
    w = Words.of("x y x y x y q")
    # most frequent 2-gram "x y" occurs 3 times, 2 chars each, of 7 chars total
    assert top_ngram_char_frac(w, 2) == pytest.approx(6 / 7)
    assert top_ngram_char_frac(Words.of("a b c d e"), 2) == 0.0  # nothing repeats


def test_document_repeated_twice_is_half_duplicate():
    words = words_text(100).split()
    w = Words.of(" ".join(words + words))
    assert dup_ngram_char_frac(w, 5) == pytest.approx(0.5)
    assert qf().apply(" ".join(words + words))[1] == "dup_5gram_char_frac"


def test_c4_line_rules():
    text = "\n".join([
        "A heading without punctuation",
        "This line is a proper sentence with enough words.",
        "Too short.",
        "Please enable Javascript to view this page properly now.",
        "Read our privacy policy before you continue reading here.",
        "Another fine sentence follows the first one here [12].",
        "Is this a question with five words?",
        "And this one ends with a quote \"like this.\"",
        "An unfinished thought trails off into the distance...",
    ])
    cleaned, reason = c4_clean(text)
    assert reason is None
    assert cleaned.split("\n") == [
        "This line is a proper sentence with enough words.",
        "Another fine sentence follows the first one here .",
        "Is this a question with five words?",
        "And this one ends with a quote \"like this.\"",
    ]
    assert c4_clean("Short one. Two here.\nOnly two sentences in this document.")[1] == "c4_too_few_sentences"
    assert c4_clean(text + "\nfunction f() { return 1; }")[1] == "c4_curly_bracket"
    assert c4_clean(text + "\nfunction f() { return 1; }", drop_curly=False)[1] is None
    assert c4_clean(text + "\nLorem ipsum dolor sit amet, consectetur.")[1] == "c4_lorem_ipsum"


def test_filter_rewrites_with_c4_and_returns_words():
    f = QualityFilter(QualityConfig())
    text = "Title line\n" + PROSE + "\nLater centuries saw the valley become a centre of learning and art."
    out, reason, w = f.apply(text)
    assert reason is None and "Title line" not in out
    assert w is not None and w.words == out.split()
