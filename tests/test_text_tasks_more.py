"""The text tasks added after the original 8: their parsers on tiny hand-written inputs, the task sets, the data
model's pair / regression fields (splits, JSON cache) and the new metrics. No downloads, no model."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from symerge.data import text_corpus as tc
from symerge.data import text_sources as ts
from symerge.data import text_sources_extra as tx
from symerge.data import text_tasks as tt
from symerge.data.text_corpus import TextTask
from symerge.data.text_tasks import split_task

# --------------------------------------------------------------------------- registry and task sets


def test_registry_holds_twenty_tasks_in_named_sets() -> None:
    sets = tt.TASK_SETS
    assert len(tt.TEXT_TASKS) >= 20 and sets["all"] == list(tt.TEXT_TASKS)
    assert sets["text8"] == tt.DEFAULT_TASKS and len(sets["text8"]) == 8
    assert sets["text14"][:8] == sets["text8_v1"] and len(sets["text14"]) == 14
    # the default 8 are one task per kind of text, all inside text14 (so the 8 -> 14 -> 20 experts are shared)
    assert set(sets["text8"]) <= set(sets["text14"]) and sets["text8"] != sets["text8_v1"]
    assert sets["text20"][:14] == sets["text14"] and len(set(sets["text20"])) == 20
    assert set(sets["text20"]) <= set(tt.TEXT_TASKS)


def test_expand_task_names() -> None:
    assert tt.expand_task_names(["all"]) == list(tt.TEXT_TASKS)
    assert tt.expand_task_names(["text8", "vader_nyt"]) == tt.TASK_SETS["text8"] + ["vader_nyt"]
    # a task a set already brought in is not repeated, in either order
    assert tt.expand_task_names(["bbc_topic", "text8"]) == tt.TASK_SETS["text8"]
    assert tt.expand_task_names(["text8", "bbc_topic"]) == tt.TASK_SETS["text8"]
    assert tt.expand_task_names(["text8_v1", "text14"]) == tt.TASK_SETS["text14"]
    text8 = tt.TASK_SETS["text8"]
    assert tt.expand_task_names(["text8", "text14"]) == text8 + [t for t in tt.TASK_SETS["text14"] if t not in text8]
    assert tt.expand_task_names(["sms_spam", "sms_spam"]) == ["sms_spam", "sms_spam"]  # left to the repeat check
    with pytest.raises(ValueError, match="unknown text task 'nope' \\(nor a task set\\).*sets: text8"):
        tt.expand_task_names(["nope"])


def test_suite_config_expands_sets() -> None:
    import pydantic

    from symerge.suites.text import TextSuiteConfig

    assert TextSuiteConfig(tasks="all").tasks == list(tt.TEXT_TASKS)
    assert TextSuiteConfig(tasks=["text14"]).tasks == tt.TASK_SETS["text14"]
    assert TextSuiteConfig(tasks=["trec_fine", "text8"]).tasks == ["trec_fine"] + tt.TASK_SETS["text8"]
    assert TextSuiteConfig().tasks == []  # empty = the 8 defaults
    assert TextSuiteConfig.quick_preset(tasks=["text20"]).tasks == tt.TASK_SETS["text20"]
    with pytest.raises(pydantic.ValidationError, match="unknown text task 'text99'"):
        TextSuiteConfig(tasks=["text99"])
    with pytest.raises(pydantic.ValidationError, match="'sms_spam' given twice"):
        TextSuiteConfig(tasks=["sms_spam", "sms_spam"])


def test_cli_bench_text_accepts_set_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from symerge import cli
    from symerge.suites import text

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(cfg, out, progress=True):  # stops before any download or training
        seen["tasks"] = cfg.tasks
        raise Stop

    monkeypatch.setattr(text, "run_text_suite", fake_run)
    with pytest.raises(Stop):
        cli.main(["bench", "text", "--tasks", "all", "--out", str(tmp_path / "run"), "--no-progress"])
    assert seen["tasks"] == list(tt.TEXT_TASKS)
    with pytest.raises(Stop):
        cli.main(["bench", "text", "--quick", "--tasks", "text14,vader_nyt", "--out", str(tmp_path / "run2")])
    assert seen["tasks"] == tt.TASK_SETS["text14"] + ["vader_nyt"]


# --------------------------------------------------------------------------- parsers


def test_trec_fine_labels_keep_the_coarse_prefix() -> None:
    text = (
        "LOC:other Where is Belize located ?\n"
        "NUM:other How far is it to the moon ?\n"
        "HUM:ind Who wrote Hamlet ?\n"
        "HUM:gr Who wrote Hamlet ?\n"
    )
    rows = ts.parse_trec(text, fine=True)
    assert [label for label, _ in rows] == ["LOC:other", "NUM:other", "HUM:ind", "HUM:gr"]
    assert [label for label, _ in ts.parse_trec(text)] == ["LOC", "NUM", "HUM", "HUM"]
    # the duplicate question keeps its first label, so HUM:gr has no distinct text and ranks last
    assert tc.top_labels(rows, 3) == ["HUM:ind", "LOC:other", "NUM:other"]


def test_fortune_topics_skip_grab_bags_and_rank_by_distinct_items() -> None:
    def items(*texts: str) -> str:
        return "%\n".join(f"{t}\n" for t in texts) + "%\n"

    files = {
        "cookie": items(*(f"a cookie saying number {i}" for i in range(9))),
        "people": items("people are strange when you're a stranger", "every person is a world of its own"),
        "work": items("work expands to fill the time available", "work expands to fill the time available"),
        "science": items("the universe is under no obligation to make sense", "science is organized knowledge",
                          "nature abhors a vacuum cleaner"),
    }
    pairs = tx.fortune_topic_pairs(files, n_topics=2)
    assert Counter(label for label, _ in pairs) == {"people": 2, "science": 3}  # cookie is a grab bag; work has 1


def test_is_top_level_fortune(tmp_path: Path) -> None:
    base = tmp_path / "usr" / "share" / "games" / "fortunes"
    (base / "de").mkdir(parents=True)
    for rel in ["people", "de/zitate", "people.dat"]:
        (base / rel).write_text("Hello there my friend\n%\n")
    kept = sorted(p.name for p in base.rglob("*") if tx.is_top_level_fortune(p))
    assert kept == ["people"]


def test_topic_blocks_follow_the_concatenated_sets() -> None:
    texts = (
        ["coachella was fun"] * 6
        + ["what a weekend"]  # no keyword, inside the coachella block
        + ["coachella lineup"] * 5
        + ["@united lost my bag"] * 6
        + ["apple pie at coachella"]  # stray mention inside the airline block
        + ["@JetBlue thanks"] * 6
        + ["lonely coachella tweet"]  # a stray hit far from its block: no topic
    )
    texts = texts[:-1] + ["x"] * 8 + texts[-1:]
    patterns = {"airline": ts.AIRLINE_RE, "coachella": tx.TWEET_TOPICS["coachella"]}
    topics = tx.topic_blocks(texts, patterns, min_run=5, max_gap=2)
    assert topics[:12] == ["coachella"] * 12
    assert topics[12:25] == ["airline"] * 13
    assert topics[25:] == [None] * 9


def test_topic_words_are_masked_with_their_token() -> None:
    masked = tx.mask_topic_words("@AppleSupport my iPhone died #Apple; @united and @VirginAmerica lost bags, "
                                 "#DeflateGate: Brady & the Patriots; self-driving / driverless / Driver-less cars; "
                                 "Claritin-D at #coachella2015")
    assert masked == ("[MASK] my iPhone died [MASK]; [MASK] and [MASK] lost bags, [MASK]: [MASK] & the [MASK]; "
                      "[MASK] / [MASK] / [MASK] cars; [MASK]-D at [MASK]")


def test_vader_ground_truth_parsing() -> None:
    text = ("id\tsentiment\ttext\r\n"
            "1\t2.726315789\tSo lucky &amp; happy.\r\n"
            "2\t-1.5\tA tab\tinside the text\r\n"
            "3\tn/a\tbroken\r\n"
            "junk line\n"
            "4\t0.2\tExecute like lightning")
    assert tx.parse_vader_ground_truth(text) == [
        (2.726315789, "So lucky & happy."),
        (-1.5, "A tab\tinside the text"),
        (0.2, "Execute like lightning"),
    ]


WORDNET_LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    '00001740 29 v 02 breathe 0 respire 0 000 | draw air into, and expel out of, the lungs; '
    '"I can breathe better now"; "The patient is respiring"  ',
    '00002000 31 v 01 breathe 1 000 | manifest or evince; "She breathes the same sweetness"  ',
    '00003000 30 v 01 sleep 0 000 | be asleep; "The baby slept"  ',  # monosemous: no hard negative
    "00004000 29 v 01 Respire 2 000 | undergo the metabolic processes of respiration  ",
]


def test_wordnet_synsets_parsing() -> None:
    synsets = tx.parse_wordnet_synsets(WORDNET_LINES)
    assert [s.lemmas for s in synsets] == [("breathe", "respire"), ("breathe",), ("sleep",), ("respire",)]
    assert synsets[0] == tx.Synset("verb.body", ("breathe", "respire"), "draw air into, and expel out of, the lungs",
                                   ("I can breathe better now", "The patient is respiring"))
    assert synsets[1].lexname == "verb.cognition" and synsets[3].examples == ()


def test_gloss_match_rows_pair_examples_with_own_or_other_sense() -> None:
    synsets = tx.parse_wordnet_synsets(WORDNET_LINES)
    rows = tx.gloss_match_rows(synsets, seed=0)
    assert rows == tx.gloss_match_rows(synsets, seed=0)  # seeded
    examples = {example for _, example, _ in rows}
    assert examples == {"I can breathe better now", "The patient is respiring", "She breathes the same sweetness"}
    own = {s.examples[i]: s.definition for s in synsets for i in range(len(s.examples))}
    others = {"I can breathe better now": {synsets[1].definition, synsets[3].definition},
              "The patient is respiring": {synsets[1].definition, synsets[3].definition},
              "She breathes the same sweetness": {synsets[0].definition}}
    for label, example, definition in rows:
        assert definition == own[example] if label == "same_sense" else definition in others[example]
    labels = {label for seed in range(20) for label, _, _ in tx.gloss_match_rows(synsets, seed=seed)}
    assert labels == {"same_sense", "other_sense"}


def test_movie_dialog_and_reply_selection() -> None:
    text = ',statement,reply\n0,"no, no, it\'s my fault we met ",cameron is here.\n1,what?,yes.\n2,a b c,d e f\n'
    dialog = tx.parse_movie_dialog_csv(text)
    assert dialog == [("no, no, it's my fault we met ", "cameron is here."), ("what?", "yes."), ("a b c", "d e f")]
    many = [(f"statement number {i} here", f"reply number {i} there") for i in range(200)] + [("what?", "yes.")]
    rows = tx.reply_selection_rows(many, seed=0)
    assert rows == tx.reply_selection_rows(many, seed=0)
    assert all("what?" not in s for _, s, _ in rows)  # too short to carry a label
    for label, s, r in rows:
        true = s.replace("statement", "reply").replace("here", "there")
        assert (r == true) == (label == "true_reply")
    counts = Counter(label for label, _, _ in rows)
    assert abs(counts["true_reply"] - counts["random_reply"]) < 40


# --------------------------------------------------------------------------- pair and regression tasks


def _pair_task(n: int = 120) -> TextTask:
    rows = [("same_sense" if i % 2 else "other_sense", f"example {i}", f"definition {i % 7}") for i in range(n)]
    rows.append(("same_sense", "example 3", "another definition"))  # the first text again: dropped
    return tc.build_pair_task("pairs", rows, "test", class_order=tx.GLOSS_CLASSES)


def test_build_pair_task_dedups_on_the_first_text_and_balances() -> None:
    task = _pair_task()
    assert task.is_pair and task.kind == "classification" and len(task.texts) == 120
    assert task.texts_b[task.texts.index("example 3")] == "definition 3"
    capped = tc.build_pair_task("pairs", [(lab, a, b) for lab, a, b in zip(
        ["other_sense"] * 90 + ["same_sense"] * 30, [f"a{i}" for i in range(120)], ["b"] * 120)],
        "test", class_order=tx.GLOSS_CLASSES, max_total=40)
    assert capped.class_counts == {"other_sense": 20, "same_sense": 20}


def test_split_keeps_pairs_together_and_disjoint() -> None:
    task = _pair_task()
    truth = {a: (b, y) for a, b, y in zip(task.texts, task.texts_b, task.labels)}
    split = split_task(task, n_train=60, n_adapt=20, n_test=20, seed=0)
    assert split.targets is None and set(split.texts_b) == {"train", "adapt", "test"}
    seen: list[tuple[str, str]] = []
    for part in ("train", "adapt", "test"):
        texts, labels = getattr(split, part)
        assert len(texts) == len(split.texts_b[part]) == len(labels)
        for a, b, y in zip(texts, split.texts_b[part], labels):
            assert truth[a] == (b, y)
            seen.append((a, b))
    assert len(seen) == len(set(seen)) == 100
    assert (len(split.train[0]), len(split.adapt[0]), len(split.test[0])) == (60, 20, 20)
    assert Counter(split.test[1]) == {0: 10, 1: 10}
    assert split == split_task(task, 60, 20, 20, seed=0)


def test_split_collapses_identical_pairs_only() -> None:
    task = TextTask("p", ["a", "a", "a", "b", "c", "d"], [0, 1, 1, 1, 0, 1], ["n", "y"], "t",
                    texts_b=["x", "y", "x", "x", "x", "x"])
    split = split_task(task, n_train=3, n_adapt=1, n_test=1, seed=0)
    rows = [(a, b, y) for part in ("train", "adapt", "test")
            for a, b, y in zip(getattr(split, part)[0], split.texts_b[part], getattr(split, part)[1])]
    # ("a", "x") twice collapses to its first row; ("a", "y") is another pair
    assert sorted(rows) == [("a", "x", 0), ("a", "y", 1), ("b", "x", 1), ("c", "x", 0), ("d", "x", 1)]
    with pytest.raises(ValueError, match="'p' has only 5 pairs"):
        split_task(task, n_train=100, n_adapt=1, n_test=1, seed=0)


def test_quantile_bins() -> None:
    assert tc.quantile_bins([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 5) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert tc.quantile_bins([2.0, 1.0, 1.0, 1.0], 2) == [1, 0, 0, 0]  # equal values share a bin
    assert tc.quantile_bins([3.0, 1.0], 5) == [1, 0] and tc.quantile_bins([], 5) == []


def test_build_regression_task_and_split_carry_targets() -> None:
    rng = random.Random(0)
    rows = [(round(rng.uniform(-4, 4), 3), f"text {i}") for i in range(300)]
    rows += [(9.0, "text 5"), (float("nan"), "a nan target")]  # a repeated text keeps its first target
    task = tc.build_regression_task("reg", rows, "test", max_total=250)
    assert task.kind == "regression" and task.class_names == ["score"] and len(task.texts) == 250
    assert task == tc.build_regression_task("reg", rows, "test", max_total=250)  # seeded cap
    truth = dict(zip(task.texts, task.targets))
    assert "a nan target" not in truth and all(-4 <= y <= 4 for y in task.targets)
    assert Counter(task.labels) == {b: 50 for b in range(5)} and task.class_counts == {"score": 250}
    split = split_task(task, n_train=150, n_adapt=50, n_test=50, seed=1)
    assert split.texts_b is None
    all_texts = split.train[0] + split.adapt[0] + split.test[0]
    assert len(all_texts) == len(set(all_texts)) == 250
    for part in ("train", "adapt", "test"):
        assert [truth[t] for t in getattr(split, part)[0]] == split.targets[part]
    assert Counter(split.test[1]) == {b: 10 for b in range(5)}  # stratified by target bins


def test_text_task_checks_field_lengths() -> None:
    with pytest.raises(ValueError, match="'bad': 1 targets for 2 texts"):
        TextTask("bad", ["a", "b"], [0, 0], ["score"], "t", targets=[1.0])
    with pytest.raises(ValueError, match="'bad': 3 texts_b for 2 texts"):
        TextTask("bad", ["a", "b"], [0, 1], ["n", "y"], "t", texts_b=["x", "y", "z"])


def test_json_cache_round_trips_new_fields_and_keeps_the_old_layout(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path))
    pair = _pair_task(20)
    regression = tc.build_regression_task("vader_nyt", [(float(i), f"t{i}") for i in range(20)], "src")
    plain = tc.build_task("bbc_topic", [("a", "x y"), ("b", "z")], "src")
    for name, task in (("gloss_match_verb", pair), ("vader_nyt", regression), ("bbc_topic", plain)):
        monkeypatch.setitem(tt.TEXT_TASKS, name, lambda task=task: task)
        first = tt.load_text_task(name)
        monkeypatch.setitem(tt.TEXT_TASKS, name, lambda: pytest.fail("rebuilt despite the cache"))
        assert tt.load_text_task(name) == first == task
    stored = json.loads((tmp_path / "tasks" / "bbc_topic.json").read_text())
    assert set(stored) == {"version", "max_texts", "name", "texts", "labels", "class_names", "source"}
    # a cache written before the new fields existed still loads
    legacy = {"version": tc.CACHE_VERSION, "max_texts": tc.MAX_TEXTS, "name": "bbc_topic", "texts": ["q"],
              "labels": [0], "class_names": ["a"], "source": "old"}
    (tmp_path / "tasks" / "bbc_topic.json").write_text(json.dumps(legacy))
    assert tt.load_text_task("bbc_topic") == TextTask("bbc_topic", ["q"], [0], ["a"], "old")


# --------------------------------------------------------------------------- metrics


def test_regression_score_matches_scipy() -> None:
    from scipy import stats

    from symerge.evaluation.metrics import regression_score

    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(200, 1, generator=gen)
    outputs = 0.7 * targets + 0.5 * torch.randn(200, 1, generator=gen)
    score = regression_score(outputs, targets)
    x, y = outputs.reshape(-1).numpy(), targets.reshape(-1).numpy()
    assert score.primary == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-6)
    assert score.metrics["pearson"] == score.primary and score.ece is None
    assert score.metrics["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-5)
    assert score.metrics["mae"] == pytest.approx(float(abs(x - y).mean()), abs=1e-6)
    assert regression_score(outputs.reshape(-1), targets).primary == pytest.approx(score.primary)
    constant = regression_score(torch.zeros(10, 1), targets[:10])
    assert constant.primary == 0.0 and not math.isnan(constant.metrics["spearman"])
    with pytest.raises(ValueError, match="one value per sample"):
        regression_score(torch.zeros(10, 2), targets[:10])


def test_classification_score_adds_mcc() -> None:
    from sklearn.metrics import matthews_corrcoef

    from symerge.evaluation.metrics import classification_score

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (300,), generator=gen)
    logits = torch.randn(300, 4, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    score = classification_score(logits, labels)
    expected = matthews_corrcoef(labels.numpy(), logits.argmax(1).numpy())
    assert score.metrics["mcc"] == pytest.approx(expected, abs=1e-6)
    assert score.primary == score.metrics["accuracy"] and score.ece is not None
    binary = classification_score(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert binary.metrics["mcc"] == pytest.approx(matthews_corrcoef([0, 1, 1], [0, 1, 0]))


# --------------------------------------------------------------------------- real data

EXPECTED = {  # name -> (kind, pair task, number of classes)
    "trec_fine": ("classification", False, 16),
    "verb_supersense": ("classification", False, 8),
    "fortune_topic": ("classification", False, 8),
    "tweet_domain": ("classification", False, 6),
    "apple_sentiment": ("classification", False, 3),
    "deflategate_sentiment": ("classification", False, 3),
    "vader_tweets": ("regression", False, 1),
    "vader_nyt": ("regression", False, 1),
    "vader_amazon": ("regression", False, 1),
    "gloss_match_verb": ("classification", True, 2),
    "gloss_match_noun": ("classification", True, 2),
    "dialog_reply": ("classification", True, 2),
}


@pytest.mark.slow
def test_load_the_new_tasks_for_real() -> None:
    assert set(EXPECTED) == set(tt.TASK_SETS["text20"]) - set(tt.TASK_SETS["text8"])
    for name, (kind, pair, classes) in EXPECTED.items():
        task = tt.load_text_task(name)
        assert (task.kind, task.is_pair, len(task.class_names)) == (kind, pair, classes), name
        assert 3000 <= len(task.texts) <= tc.MAX_TEXTS and len(set(task.texts)) == len(task.texts)
        assert task.source and min(Counter(task.labels).values()) >= 100
        split = split_task(task, n_train=200, n_adapt=100, n_test=100, seed=0)
        keys = [(a, b) for part in ("train", "adapt", "test") for a, b in zip(
            getattr(split, part)[0], split.texts_b[part] if pair else getattr(split, part)[0])]
        assert len(set(keys)) == 400
