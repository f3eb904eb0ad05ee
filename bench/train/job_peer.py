"""The training job's side of `PEER=job bash bench/train/compare.sh`: times deploy/trainer-job's own step functions
(`instructd_job.sft.train_step`, `instructd_job.reward_model.train_step`) on the batch shapes
`instructd bench-train --row` uses, and prints one JSON line in its schema (engine "pytorch", peer
"trainer-job"), so bench/train/summary.py puts the two side by side.

    python bench/train/job_peer.py --model models/smollm2-135m-instruct --row sft:4x128:0 --rounds 3 --warmup 1

Rows: sft:NxT:F (N sequences of T input tokens, the first quarter prompt, loss on the rest, one micro-batch) and
rm:KxT:F (one prompt's K completions of T tokens, all pairs ordered); F freezes the embedding and the lowest F
layers. Each step is the job's whole optimiser step (forward, backward, clip, Adam) as it runs in a refresh.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "trainer-job"))

from instructd_job import common, reward_model, sft  # noqa: E402

PASSAGE = (
    "The history of the printing press begins with the need to copy texts faster than scribes could. Movable "
    "type, ink that clung to metal, and a press adapted from those used for wine and olive oil came together in "
    "the fifteenth century. Within fifty years presses operated in hundreds of towns, books became cheaper, and "
    "ideas travelled further and faster than ever before. "
)


class OneProcess:
    """What the step functions ask of Accelerate, for one process without it (no wrapper overhead to time)."""

    num_processes = 1
    process_index = 0

    @staticmethod
    def backward(loss):
        loss.backward()


def text_sequences(tokenizer, length, count):
    passage = tokenizer.encode(PASSAGE * (length // 40 + 2), add_special_tokens=False)
    out = []
    for i in range(count):
        ids = tokenizer.encode(f"Example {i}. ", add_special_tokens=False) + passage
        out.append(ids[:length])
    return out


def cpu_secs():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--row", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    stage, shape, frozen = args.row.split(":")
    n, t = (int(x) for x in shape.split("x"))
    frozen = int(frozen)
    model_dir = Path(args.model)
    tokenizer = common.load_tokenizer(model_dir)
    accelerator = OneProcess()
    if stage == "sft":
        model = common.load_policy(model_dir)
        common.freeze_layers(model, frozen)
        batch = [(ids, max(t // 4, 1)) for ids in text_sequences(tokenizer, t + 1, n)]
        config = {**sft.DEFAULTS, "batch_size": n, "micro_batch_size": n}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = common.adam(params, {})
        tokens = n * t

        def step():
            sft.train_step(model, params, batch, config, optimizer, 1e-6, accelerator)
    elif stage == "rm":
        rm = reward_model.RewardModel.from_policy(model_dir, 0, t)
        common.freeze_layers(rm.lm, frozen)
        rankings = [{"sequences": text_sequences(tokenizer, t, n), "ranks": list(range(n)),
                     "pairs": n * (n - 1) // 2, "weight": 1.0}]
        config = {**reward_model.DEFAULTS, "batch_prompts": 1, "micro_batch_prompts": 1}
        params = [p for p in rm.parameters() if p.requires_grad]
        optimizer = common.adam(params, {})
        tokens = n * t

        def step():
            reward_model.train_step(rm, rm, params, rankings, config, optimizer, 1e-6, accelerator)
    else:
        raise SystemExit(f"unknown stage {stage} (sft or rm)")
    rounds = []
    for r in range(args.warmup + args.rounds):
        started, cpu = time.perf_counter(), cpu_secs()
        step()
        if r >= args.warmup:
            rounds.append((time.perf_counter() - started, cpu_secs() - cpu))
    rounds.sort()
    secs, cpu = rounds[len(rounds) // 2]
    print(json.dumps({
        "engine": "pytorch",
        "peer": "trainer-job",
        "stage": stage,
        "shape": shape,
        "frozen_layers": frozen,
        "step_secs": secs,
        "tokens_per_sec": tokens / secs,
        "forward_secs": float("nan"),
        "backward_secs": float("nan"),
        "gradients_secs": float("nan"),
        "optimizer_secs": float("nan"),
        "rollout_secs": 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cpu_utilisation": cpu / secs,
        "rounds": [s for s, _ in rounds],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
