"""Launched by `torchrun` from test_distributed.py: one data-parallel adaptation; rank 0 saves what it learned."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", default="symerge")
    parser.add_argument("--die-at-step", type=int, default=-1, help="rank 1 exits abruptly at this step")
    parser.add_argument("--update", default="sequential")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint every 2 steps here, resume from it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from toy import FAST_DISTRIBUTED, build_toy_problem, distributed_options

    from symerge.adaptive import TrainerConfig, build_trainer
    from symerge.adaptive.distributed import current_world
    from symerge.adaptive.finish import finish
    from symerge.atomic import atomic_save

    problem = build_toy_problem()
    trainer = build_trainer(args.method, problem.encoder, problem.heads, problem.task_vectors(), problem.adapt_inputs,
                            config=TrainerConfig(**FAST_DISTRIBUTED, update=args.update, checkpoint_path=args.checkpoint,
                                                 checkpoint_every=2 if args.checkpoint else 0,
                                                 resume=args.checkpoint is not None),
                            **distributed_options(args.method))
    world = current_world()

    def die(step: int, task: str, loss: object) -> None:
        if step == args.die_at_step and world.rank == 1:
            os._exit(3)

    trainer.run(callback=die)
    result = finish(trainer)
    if world.is_main:
        x = {t: problem.test_inputs[t][:64] for t in result.tasks}
        atomic_save({"world": world.size, "lambdas": result.lambdas, "history": result.loss_history,
                     "heads": {t: h.state_dict() for t, h in result.heads.items()},
                     "predictions": {t: result.predict(t, x[t]) for t in result.tasks},
                     "runs_per_sample": result.provenance["expert_runs_per_sample"]}, args.out)


if __name__ == "__main__":
    main()
