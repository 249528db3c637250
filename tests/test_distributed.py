"""Data-parallel adaptation under torchrun (gloo, 2 processes on the CPU) equals one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symerge.adaptive import TrainerConfig, adapt
from toy import FAST_DISTRIBUTED, build_toy_problem, distributed_options

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def single_process(method: str, update: str = "sequential"):
    problem = build_toy_problem()
    method_name = "symerge" if method == "symerge-block" else method
    result = adapt(method_name, problem.encoder, problem.heads, problem.task_vectors(), problem.adapt_inputs,
                   config=TrainerConfig(**FAST_DISTRIBUTED, update=update), **distributed_options(method))
    x = {t: problem.test_inputs[t][:64] for t in result.tasks}
    return result, {t: result.predict(t, x[t]) for t in result.tasks}


@pytest.mark.parametrize("method,update", [("symerge", "sequential"), ("symerge", "summed"), ("adamerging", "sequential"),
                                           ("surgery", "sequential")])
def test_two_ranks_equal_one_process(tmp_path, method, update):
    out = tmp_path / "rank0.pt"
    proc = torchrun(out, "--method", method, "--update", update)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    reference, predictions = single_process(method, update)
    torch.testing.assert_close(got["lambdas"], reference.lambdas, atol=1e-5, rtol=0)
    for task, head in reference.heads.items():
        for name, value in head.state_dict().items():
            torch.testing.assert_close(got["heads"][task][name], value, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["predictions"][task], predictions[task], atol=1e-5, rtol=1e-5)
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in reference.loss_history], abs=1e-5)
    assert got["runs_per_sample"] == {t: 1.0 for t in reference.tasks}  # the expert pass was sharded, not repeated


def test_a_rank_dying_fails_the_launch_writes_nothing_and_the_rerun_resumes(tmp_path):
    out, ckpt = tmp_path / "out" / "rank0.pt", tmp_path / "ckpt" / "state.pt"
    ckpt.parent.mkdir()
    proc = torchrun(out, "--die-at-step", "3", "--checkpoint", str(ckpt))
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr and "3" in proc.stderr  # torchrun names the failed rank and its exit code
    assert not out.parent.exists()  # no half-written output
    assert [p.name for p in ckpt.parent.iterdir()] == ["state.pt"]  # rank 0's step-2 checkpoint, complete
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    proc = torchrun(out, "--checkpoint", str(ckpt))  # the same launch again resumes from step 2 on both ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, _ = single_process("symerge")
    torch.testing.assert_close(torch.load(out, weights_only=True)["lambdas"], reference.lambdas, atol=1e-5, rtol=0)


def test_merge_command_under_torchrun_equals_one_process(tmp_path):
    """`torchrun ... -m symerge.cli merge CONFIG` on 2 ranks: rank 0 writes one output equal to a 1-process run."""
    import hf_tiny

    import symerge
    from symerge.pipeline import run_merge

    labels = {"alpha": 2, "beta": 3}
    pre, experts = hf_tiny.make_pool(tmp_path, "bert", labels)
    adapt_files, eval_files = hf_tiny.write_data(tmp_path, labels, n=20)
    config = {
        "model": {"family": "hf_text", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()}},
        "method": {"name": "symerge", "trainer": {"steps": 3, "batch_size": 7, "lr": 1e-2, "layer_lr": 1e-2}},
        "data": {"adapt": adapt_files, "eval": eval_files, "max_len": hf_tiny.MAX_LEN},
        "output_dir": "merged",
    }
    path = hf_tiny.write_config(tmp_path / "config.yaml", **config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "symerge.cli", "merge", str(path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("merged 2 tasks") == 1  # one report, from rank 0
    distributed = symerge.load(tmp_path / "merged")
    single, _ = run_merge({**config, "output_dir": str(tmp_path / "single")}, progress=False)
    torch.testing.assert_close(distributed.lambdas, single.lambdas, atol=1e-5, rtol=0)
    for task in labels:
        for name, value in single.heads[task].state_dict().items():
            torch.testing.assert_close(distributed.heads[task].state_dict()[name], value, atol=1e-5, rtol=0)
