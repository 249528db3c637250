"""`symerge bench <suite> --seeds 0,1,2`: one report per seed, then each method's mean ± sample std over seeds."""

from __future__ import annotations

import json
import statistics

import pytest

from symerge.cli import main
from symerge.errors import ValidationError
from symerge.suites.seeds import check_seeds, summarize_reports

SCORES = {0: {"symerge": 0.97, "task_arithmetic": 0.80}, 1: {"symerge": 0.99, "task_arithmetic": 0.84},
          2: {"symerge": 0.98, "task_arithmetic": 0.79}}


def fake_suite(calls: list):
    """A stand-in suite run: records the seed it was given and writes a report whose scores depend on it."""
    def run(cfg, out_dir, progress=True):
        calls.append(cfg.seed)
        methods = {m: {"normalized_average": v, "average": v - 0.1, "seconds": 10.0 + cfg.seed}
                   for m, v in SCORES[cfg.seed].items()}
        report = {"methods": methods, "total_seconds": 1.0}
        out_dir.mkdir(parents=True)
        (out_dir / "report.json").write_text(json.dumps(report))
        (out_dir / "report.md").write_text("# report\n")
        return report

    return run


def test_bench_seeds_writes_a_report_per_seed_and_the_mean_and_std(tmp_path, monkeypatch, capsys):
    import symerge.suites.text

    calls: list[int] = []
    monkeypatch.setattr(symerge.suites.text, "run_text_suite", fake_suite(calls))
    out = tmp_path / "seeds"
    assert main(["bench", "text", "--quick", "--seeds", "0,1,2", "--out", str(out), "--no-progress"]) == 0
    assert calls == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["seed-0", "seed-1", "seed-2", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    for method in ("symerge", "task_arithmetic"):
        values = [SCORES[s][method] for s in (0, 1, 2)]
        stats = summary["methods"][method]["normalized_average"]
        assert stats["mean"] == pytest.approx(statistics.fmean(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values))
        assert stats["values"] == {str(s): SCORES[s][method] for s in (0, 1, 2)}
    assert "| symerge | 98.0 ± 1.0 |" in (out / "summary.md").read_text()
    assert "98.0 ± 1.0" in capsys.readouterr().out
    # a second run into the same folder needs --overwrite, and is allowed with it
    assert main(["bench", "text", "--quick", "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 2
    assert main(["bench", "text", "--quick", "--seeds", "0,1", "--out", str(out), "--overwrite", "--no-progress"]) == 0


def test_bad_seed_lists_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import symerge.suites.text

    monkeypatch.setattr(symerge.suites.text, "run_text_suite", fake_suite([]))
    assert main(["bench", "text", "--seeds", "0,0", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "seed 0 given twice" in capsys.readouterr().err
    for seeds in ("a,b", ","):  # argparse refuses these (exit status 2)
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "text", "--seeds", seeds, "--out", str(tmp_path / "x"), "--no-progress"])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["bench", "text", "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValidationError, match="seed 3 given twice"):
        check_seeds([3, 3])


def test_summary_keeps_methods_run_for_every_seed():
    reports = {0: {"methods": {"a": {"normalized_average": 1.0, "average": 1.0, "seconds": 1.0},
                               "b": {"normalized_average": 1.0, "average": 1.0, "seconds": 1.0}}},
               1: {"methods": {"a": {"normalized_average": 0.5, "average": 0.5, "seconds": 1.0}}}}
    assert list(summarize_reports(reports)) == ["a"]
    assert summarize_reports({0: reports[0]})["a"]["normalized_average"]["std"] == 0.0


def test_summarize_combines_seeds_run_as_separate_commands(tmp_path, monkeypatch, capsys):
    """`symerge summarize DIR` over seed-N/ reports gives the summary one `--seeds` run would have written."""
    import symerge.suites.text

    monkeypatch.setattr(symerge.suites.text, "run_text_suite", fake_suite([]))
    together = tmp_path / "together"
    assert main(["bench", "text", "--quick", "--seeds", "0,1,2", "--out", str(together), "--no-progress"]) == 0
    apart = tmp_path / "apart"
    for seed in (2, 0, 1):  # any order, one command each
        report = json.loads((together / f"seed-{seed}" / "report.json").read_text())
        (apart / f"seed-{seed}").mkdir(parents=True)
        (apart / f"seed-{seed}" / "report.json").write_text(json.dumps({**report, "seed": seed, "suite": "text",
                                                                          "protocol": "held-out"}))
    assert main(["summarize", str(apart)]) == 0
    expected = json.loads((together / "summary.json").read_text())["methods"]
    got = json.loads((apart / "summary.json").read_text())
    assert got["seeds"] == [0, 1, 2] and got["methods"] == expected
    assert "| symerge | 98.0 ± 1.0 |" in (apart / "summary.md").read_text()


def test_summarize_refuses_mixed_or_mislabelled_reports(tmp_path, capsys):
    def write(folder, seed, **fields):
        (folder / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
        report = {"seed": seed, "suite": "text", "protocol": "held-out", "methods": {}, **fields}
        (folder / f"seed-{seed}" / "report.json").write_text(json.dumps(report))

    assert main(["summarize", str(tmp_path / "empty")]) == 2
    assert "no seed-N/report.json" in capsys.readouterr().err
    write(tmp_path / "mixed", 0)
    write(tmp_path / "mixed", 1, protocol="transductive")
    assert main(["summarize", str(tmp_path / "mixed")]) == 2
    assert "protocol 'transductive' differs" in capsys.readouterr().err
    write(tmp_path / "wrong", 0)
    (tmp_path / "wrong" / "seed-3").mkdir()
    (tmp_path / "wrong" / "seed-0" / "report.json").rename(tmp_path / "wrong" / "seed-3" / "report.json")
    assert main(["summarize", str(tmp_path / "wrong")]) == 2
    assert "for seed 0, not seed-3" in capsys.readouterr().err
    assert not (tmp_path / "mixed" / "summary.json").exists()


@pytest.fixture
def text_configs(monkeypatch) -> list:
    """The configs `symerge bench text` would run (the suite itself replaced: nothing trains)."""
    import symerge.suites.text

    seen: list = []
    monkeypatch.setattr(symerge.suites.text, "run_text_suite",
                        lambda cfg, out, progress=True: seen.append(cfg) or {"methods": {}, "total_seconds": 0.0})
    monkeypatch.setattr("symerge.report.markdown.methods_table", lambda report: "")
    return seen


def test_steps_option_sets_every_adaptive_rows_iterations(tmp_path, text_configs, capsys):
    """`--steps N`: every adaptive row runs N iterations (presets too); the rest of the settings stay the suite's."""
    from symerge.suites.text import TextSuiteConfig

    seen = text_configs
    assert main(["bench", "text", "--steps", "200", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    full = TextSuiteConfig()
    assert seen[-1].adapt.steps == 200 and full.adapt.steps == 100
    assert seen[-1].adapt.model_dump(exclude={"steps"}) == full.adapt.model_dump(exclude={"steps"})
    assert main(["bench", "text", "--preset", "demo", "--steps", "7", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    assert seen[-1].adapt.steps == 7 and seen[-1].adapt.curve == []
    with pytest.raises(SystemExit):
        main(["bench", "text", "--steps", "0", "--out", str(tmp_path / "c")])
    assert "--steps" in capsys.readouterr().err and len(seen) == 2 and not (tmp_path / "c").exists()


def test_presets_select_named_configurations_before_any_work(tmp_path, text_configs, capsys):
    from symerge.suites.text import DEMO_METHODS, DEMO_STEPS, TextSuiteConfig

    seen = text_configs
    assert main(["bench", "text", "--preset", "demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    demo = seen[-1]
    assert demo.methods == DEMO_METHODS and demo.cross_task_samples == 50 and demo.adapt.curve == []
    full = TextSuiteConfig()
    assert full.adapt.curve and full.cross_task_samples > 50
    assert demo.model_dump(exclude={"methods", "cross_task_samples", "adapt"}) == full.model_dump(
        exclude={"methods", "cross_task_samples", "adapt"})  # the full suite's settings: its rows score the same
    assert demo.adapt.model_dump(exclude={"curve", "steps"}) == full.adapt.model_dump(exclude={"curve", "steps"})
    assert demo.adapt.steps == DEMO_STEPS < full.adapt.steps and DEMO_STEPS in full.adapt.curve  # a full-run row
    assert main(["bench", "text", "--preset", "demo", "--methods", "symerge", "--out", str(tmp_path / "d2"),
                 "--no-progress"]) == 0
    assert seen[-1].methods == ["symerge"]  # options given win over the preset's
    assert main(["bench", "text", "--preset", "quick", "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert seen[-1].quick
    assert main(["bench", "text", "--preset", "nope", "--out", str(tmp_path / "n"), "--no-progress"]) == 2
    assert "unknown preset 'nope'; this suite has: quick, demo" in capsys.readouterr().err
    assert main(["bench", "vision", "--preset", "demo", "--out", str(tmp_path / "v"), "--no-progress"]) == 2
    assert main(["bench", "text", "--quick", "--preset", "demo", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert len(seen) == 3 and not (tmp_path / "n").exists()


def test_summary_says_how_far_the_best_merged_method_leads_each_other_one():
    """Hand-computed: leader c (means .95 vs b .90 / a .80); pretrained and individual are not merged methods."""
    from symerge.suites.seeds import leader_margins, seed_summary, summary_markdown

    norms = {"individual": [1.0, 1.0, 1.0], "pretrained": [0.99, 0.99, 0.99], "a": [0.8, 0.7, 0.9],
             "b": [0.89, 0.90, 0.91], "c": [0.94, 0.95, 0.96]}
    reports = {seed: {"methods": {m: {"normalized_average": v[i], "average": v[i], "seconds": 1.0}
                                  for m, v in norms.items()}} for i, seed in enumerate([0, 1, 2])}
    margins = leader_margins(summarize_reports(reports))
    assert margins["leader"] == "c" and set(margins["over"]) == {"a", "b"}
    b = margins["over"]["b"]
    assert b["gap"] == pytest.approx(0.05)
    assert b["gap_in_std"] == pytest.approx(0.05 / 0.01)  # both stds 0.01
    assert b["paired_mean"] == pytest.approx(0.05) and b["paired_std"] == pytest.approx(0.0, abs=1e-12)
    a = margins["over"]["a"]
    assert a["gap_in_std"] == pytest.approx(0.15 / 0.1)  # a's std 0.1 is the larger
    assert a["paired_std"] == pytest.approx((0.0182 / 2) ** 0.5)  # differences .14 .25 .06 around .15
    text = summary_markdown(seed_summary("text", "held-out", {}, reports, 1.0))
    assert "How far c leads" in text and "| b | 5.00 | 5.0 | 5.00 ± 0.00 |" in text
    assert leader_margins(summarize_reports({0: {"methods": {"a": reports[0]["methods"]["a"]}}})) == {}
