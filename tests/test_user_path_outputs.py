"""What a command leaves on disk: overwrite only our own outputs, file modes, checksums on load, unwritable and
stale output dirs, the output layout (issue 13, items 1, 5, 6, 8, 9, 17, 18)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_tiny
import symerge
from symerge import ValidationError
from symerge.cli import main
from test_safe_pickle import IMAGE, standins, task_vectors_dir  # noqa: F401 - fixtures

LABELS = {"alpha": 2, "beta": 3}
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")


def merge_config(bert, out, method=None, **extra):
    return hf_tiny.merge_config(bert, out, method or {"name": "task_arithmetic"}, adapt=False, **extra)


def run_cli(tmp_path, config, *args, name="config.yaml"):
    path = hf_tiny.write_config(tmp_path / name, **config)
    return main(["merge", str(path), *args])


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    enc = hf_tiny.tokenizer()(hf_tiny.texts(n, 7), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the merge gets as far as loading models (checks must come first)."""
    import symerge.pipeline

    def refuse(cfg):
        raise AssertionError("models were loaded before the output dir was checked")

    monkeypatch.setattr(symerge.pipeline, "load_model", refuse)


# --- item 1: --overwrite only replaces an empty dir or a previous output of ours --------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_a_symerge_output(bert, tmp_path, capsys, no_loading):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert run_cli(tmp_path, merge_config(bert, out), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "not a symerge output" in err and "symerge.json" in err, err
    assert (out / "thesis.tex").read_text() == "years of work"
    # `output_dir: .` with overwrite: the config file's own directory is never wiped
    here = tmp_path / "project"
    here.mkdir()
    (here / "notes.txt").write_text("keep")
    assert run_cli(here, merge_config(bert, ".", overwrite=True)) == 2
    assert (here / "notes.txt").read_text() == "keep" and (here / "config.yaml").is_file()
    capsys.readouterr()


def test_overwrite_replaces_an_empty_dir_or_a_previous_output(bert, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(tmp_path, merge_config(bert, out)) == 0  # an empty dir is not "existing output"
    (out / "extra.txt").write_text("left by the user inside our output")
    assert run_cli(tmp_path, merge_config(bert, out), "--overwrite") == 0
    assert (out / "symerge.json").is_file() and not (out / "extra.txt").exists()


def test_convert_overwrite_refuses_a_foreign_directory(task_vectors_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "data.bin").write_bytes(b"precious")
    assert main(["convert", str(task_vectors_dir.src), str(out), "--overwrite"]) == 2
    assert "not a symerge output" in capsys.readouterr().err
    assert (out / "data.bin").read_bytes() == b"precious" and sorted(p.name for p in out.iterdir()) == ["data.bin"]


def test_bench_overwrite_refuses_a_foreign_directory(tmp_path, capsys, monkeypatch):
    import symerge.suites.text

    def never(*args, **kwargs):
        raise AssertionError("the suite ran before the output dir was checked")

    monkeypatch.setattr(symerge.suites.text, "run_text_suite", never)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "other.csv").write_text("a,b\n")
    assert main(["bench", "text", "--quick", "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "not a symerge output" in capsys.readouterr().err and (out / "other.csv").is_file()


# --- item 5: files honour the umask --------------------------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_every_written_file_honours_the_umask(bert, tmp_path, umask_027, task_vectors_dir):  # noqa: F811
    from symerge.atomic import atomic_file, atomic_save
    from symerge.models.convert import convert_task_vectors_dir
    from symerge.pipeline import run_merge

    _, out = run_merge(merge_config(bert, tmp_path / "out"), progress=False)
    converted = tmp_path / "converted"
    convert_task_vectors_dir(task_vectors_dir.src, converted)
    atomic_save({"step": 1}, tmp_path / "ckpt" / "state.pt")
    with atomic_file(tmp_path / "plain.bin") as tmp:
        tmp.write_bytes(b"x")
    for root in (out, converted, tmp_path / "ckpt"):
        for name, mode in modes(root).items():
            want = 0o750 if (root / name).is_dir() else 0o640
            assert mode == want, (root, name, oct(mode))
    assert stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o640


# --- item 6: load verifies the recorded sha256 ---------------------------------------------------------------------
def test_load_verifies_the_recorded_checksums(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    from symerge.pipeline import run_merge

    _, out = run_merge(merge_config(bert, tmp_path / "out"), progress=False)
    head = out / "heads" / "beta.safetensors"
    state = load_file(str(head))
    save_file({k: v + 1.0 for k, v in state.items()}, str(head))  # same shapes, other weights: loads silently today
    with pytest.raises(ValidationError, match=r"heads/beta\.safetensors.*sha256") as info:
        symerge.load(out)
    assert "verify=False" in str(info.value)
    loaded = symerge.load(out, verify=False)  # the opt-out loads the changed file as it is
    assert torch.equal(loaded.heads["beta"].state_dict()[next(iter(state))], state[next(iter(state))] + 1.0)
    head.unlink()
    with pytest.raises(ValidationError, match=r"heads/beta\.safetensors.*missing"):
        symerge.load(out)
    # the standalone tasks/<task>/ dir is checked by task_model, which reads it
    from symerge.export import task_model

    _, full = run_merge(merge_config(bert, tmp_path / "full", export={"task_models": True}), progress=False)
    (full / "tasks" / "alpha" / "config.json").write_text((full / "tasks" / "beta" / "config.json").read_text())
    with pytest.raises(ValidationError, match=r"tasks/alpha/config\.json.*sha256"):
        task_model(full, "alpha")


# --- item 8: an unwritable output dir fails up front ---------------------------------------------------------------
def test_unwritable_output_dir_fails_before_any_work(bert, tmp_path, capsys, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert run_cli(tmp_path, merge_config(bert, blocker / "out")) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "cannot write" in err and "a-file" in err, err
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for other users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert run_cli(tmp_path, merge_config(bert, locked / "out")) == 2
            assert "cannot write" in capsys.readouterr().err
        finally:
            locked.chmod(0o755)


def test_probe_leaves_nothing_behind_and_names_a_permission_error(tmp_path, monkeypatch):
    import symerge.atomic
    from symerge.atomic import prepare_output_dir

    prepare_output_dir(tmp_path / "new" / "out", overwrite=False, manifests=("symerge.json",))
    assert list(tmp_path.iterdir()) == []  # neither the probe nor the parent dirs are left

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(symerge.atomic.tempfile, "mkdtemp", denied)  # what a read-only dir does (root ignores chmod)
    with pytest.raises(ValidationError, match=r"cannot write output dir .*Permission denied"):
        prepare_output_dir(tmp_path / "out", overwrite=False, manifests=("symerge.json",))


# --- item 9: stale temp dirs of a killed write are removed on the next run -----------------------------------------
KILLED_WRITE = """
import os, sys
from pathlib import Path
from symerge.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "encoder.safetensors").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), 9)
"""


def test_stale_temp_dir_of_a_killed_write_is_removed_next_run(bert, tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], capture_output=True)
    assert proc.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and not out.exists()
    foreign = [tmp_path / ".out.keep", tmp_path / ".out.abcd1234"]  # not ours: hidden dirs of the same prefix
    for folder in foreign:
        folder.mkdir()
        (folder / "file").write_text("user")
    with caplog.at_level(logging.WARNING):
        assert run_cli(tmp_path, merge_config(bert, out)) == 0
    assert not stale[0].exists(), "the killed run's temp dir is still there"
    assert all((f / "file").read_text() == "user" for f in foreign)
    assert any("stale" in r.getMessage() and stale[0].name in r.getMessage() for r in caplog.records), caplog.text


# --- item 17: per-task standalone models are optional ---------------------------------------------------------------
def test_task_models_are_optional_and_load_works_in_both_layouts(bert, tmp_path):
    from symerge.export import task_model
    from symerge.pipeline import run_merge

    inputs = batch()
    result, light = run_merge(merge_config(bert, tmp_path / "light"), progress=False)
    meta = json.loads((light / "symerge.json").read_text())
    assert not (light / "tasks").exists() and meta["export"]["task_models"] is False
    assert all(t["transformers_dir"] is None for t in meta["tasks"].values())
    _, full = run_merge(merge_config(bert, tmp_path / "full", export={"task_models": True}), progress=False)
    assert {p.name for p in (full / "tasks").iterdir()} == set(LABELS)
    for out in (light, full):
        loaded = symerge.load(out)
        for task in LABELS:
            ours = loaded.predict(task, inputs)
            torch.testing.assert_close(ours, result.predict(task, inputs), atol=1e-5, rtol=0)
            with torch.no_grad():  # a plain transformers classifier in either layout
                logits = task_model(out, task)(**inputs).logits
            torch.testing.assert_close(logits, ours, atol=1e-5, rtol=0)
    # per-task encoders (EMR): the default writes standalone models, since encoder/ + head is not that task's model
    _, emr = run_merge(merge_config(bert, tmp_path / "emr", method={"name": "emr"}), progress=False)
    assert {p.name for p in (emr / "tasks").iterdir()} == set(LABELS)
    _, emr_light = run_merge(merge_config(bert, tmp_path / "emr-light", method={"name": "emr"},
                                          export={"task_models": False}), progress=False)
    assert not (emr_light / "tasks").exists()
    torch.testing.assert_close(symerge.load(emr_light).predict("beta", inputs), symerge.load(emr).predict("beta", inputs))


def test_task_models_option_is_validated(bert, tmp_path):
    from symerge.config import parse_config

    with pytest.raises(ValidationError, match=r"export\.task_models"):
        parse_config(merge_config(bert, tmp_path / "x", export={"task_models": "sometimes"}), tmp_path)
    with pytest.raises(ValidationError, match=r"export\.taskmodels"):
        parse_config(merge_config(bert, tmp_path / "x", export={"taskmodels": True}), tmp_path)


# --- item 18: `symerge convert` output feeds `symerge merge` -------------------------------------------------------
def test_convert_output_is_a_valid_merge_input(task_vectors_dir, tmp_path, capsys):  # noqa: F811
    from symerge.merging import merge_delta
    from symerge.models.clip import load_converted_pool
    from symerge.models.convert import register_convert_command

    parser = argparse.ArgumentParser(prog="symerge")
    register_convert_command(parser.add_subparsers(dest="command", required=True))
    converted = tmp_path / "converted"
    args = parser.parse_args(["convert", str(task_vectors_dir.src), str(converted)])
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "symerge merge" in last and "family: clip" in last and str(converted) in last, last
    cfg = {"model": {"family": "clip", "pretrained": "converted",
                     "experts": {"A": "converted/A", "B": "converted/B/finetuned.safetensors"}},
           "method": {"name": "task_arithmetic"}, "output_dir": "merged"}
    assert main(["merge", str(hf_tiny.write_config(tmp_path / "clip.yaml", **cfg))]) == 0
    loaded = symerge.load(tmp_path / "merged")
    encoder, heads, pool = load_converted_pool(converted)
    merged = pool.task_vectors().apply(merge_delta("task_arithmetic", pool.task_vectors()))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        for task in ("A", "B"):
            want = heads[task](torch.func.functional_call(encoder, merged, (images,)))
            torch.testing.assert_close(loaded.predict(task, images), want, atol=1e-5, rtol=1e-5)
    # a task name that is not in the converted dir, and the state_dict family pointed at it, name the remedy
    cfg["model"]["experts"] = {"A": "converted/A", "C": "converted/C"}
    assert main(["merge", str(hf_tiny.write_config(tmp_path / "bad.yaml", **cfg))]) == 2
    assert "model.experts.C" in capsys.readouterr().err
    cfg["model"] = {"family": "state_dict", "pretrained": "converted", "experts": {"A": "converted/A", "B": "converted/B"}}
    cfg["output_dir"] = "merged2"
    assert main(["merge", str(hf_tiny.write_config(tmp_path / "sd.yaml", **cfg))]) == 2
    assert "family: clip" in capsys.readouterr().err and not (tmp_path / "merged2").exists()


def test_a_report_with_no_merged_method_still_writes(tmp_path):
    """`--methods individual` (e.g. to warm the expert cache) used to crash plotting after all the work."""
    from symerge.report.plots import make_plots

    report = {"tasks": [{"name": "a"}], "methods": {"individual": {"normalized_average": 1.0, "average": 0.9, "per_task": {"a": 0.9},
                                         "curve": []}}}
    plots = make_plots(report, tmp_path)
    assert "normalized accuracy" not in plots
    assert (tmp_path / "accuracy.png").exists()
