"""`python -m instructd_job`: runs the stage the external backend asks for (INSTRUCTD_STAGE) and writes the
model and `metrics.json` into INSTRUCTD_OUTPUT_DIR. `python -m instructd_job probe-ppo EPISODES.json` runs one
PPO update on given episodes and prints its numbers (the parity test's probe)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import common


def main(argv: list[str]) -> int:
    try:
        import torch
        from accelerate import Accelerator

        import transformers

        transformers.utils.logging.disable_progress_bar()
        torch.use_deterministic_algorithms(True, warn_only=True)
        env = common.JobEnv.from_environ()
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if argv[:1] == ["probe-ppo"] and len(argv) == 2:
            from . import ppo

            result = ppo.probe(env, accelerator, Path(argv[1]))
            # Every process computes the same numbers (the whole iteration's); one line of JSON on stdout.
            if accelerator.is_main_process:
                print(json.dumps(result), flush=True)
            finish(accelerator)
            return 0
        if argv:
            print(f"unknown arguments {argv}; usage: python -m instructd_job [probe-ppo EPISODES.json]",
                  file=sys.stderr)
            return 2
        env.output_dir.mkdir(parents=True, exist_ok=True)
        if env.stage == "sft":
            from . import sft as stage
        elif env.stage == "reward_model":
            from . import reward_model as stage
        else:
            from . import ppo as stage
        metrics = stage.run(env, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            metrics["engine"] = f"torch {torch.__version__}, {accelerator.distributed_type}, " \
                                f"{accelerator.num_processes} process(es)"
            common.write_json(env.output_dir / "metrics.json", metrics)
        finish(accelerator)
        return 0
    except common.JobError as e:
        print(f"instructd training job: {e}", file=sys.stderr)
        return 2


def finish(accelerator) -> None:
    """Several processes leave together and close their process group: a process exiting while gloo still has
    a collective's messages in flight aborts ("terminate called without an active exception")."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
