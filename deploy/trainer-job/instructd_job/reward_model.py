"""The reward model, as trainer/src/reward_model.rs does it: the policy's trunk and a scalar head read at the
last (EOS) token; each prompt's K completions forwarded once and all its ordered pairs (ties dropped) one batch
element of the ranking loss, prompts weighted by their labeler's weight; cosine decay, Adam β = (0.9, 0.95); the
epoch with the lowest validation loss kept; then the head's bias shifted so the training-split demonstrations
score 0 on average.

On disk (the layout `RewardModel::load` reads): the trunk as a model directory, `reward_head.safetensors`
(`score.weight` [1, hidden], `score.bias` [1]) and `rm.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import common
from .common import JobError

HEAD_FILE = "reward_head.safetensors"
META_FILE = "rm.json"
META_KIND = "instructd-reward-model"

DEFAULTS = {
    "epochs": 1,
    "learning_rate": 1e-5,
    "final_lr_ratio": 0.1,
    "warmup_steps": 0,
    "batch_prompts": 8,
    "micro_batch_prompts": 2,
    "residual_dropout": 0.0,
    "max_seq_len": 512,
    "max_grad_norm": 1.0,
    "adam": {},
    "seed": 0,
    "score_batch_size": 16,
    "freeze_layers": 0,
    "cache_frozen_activations": True,
    "keep_best_epoch": True,
    "early_stop_patience": None,
    "margin_per_rank": 0.0,
}


class RewardModel(torch.nn.Module):
    """A causal LM's trunk (the whole LM is kept so the directory still loads as one) and a scalar head."""

    def __init__(self, lm, meta: dict[str, Any], source_dir: Path):
        super().__init__()
        self.lm = lm
        hidden = int(lm.config.hidden_size)
        self.score = torch.nn.Linear(hidden, 1)
        self.meta = meta
        self.source_dir = source_dir
        self.tokenizer = common.load_tokenizer(source_dir)
        self.eos = common.eos_id(self.tokenizer, source_dir)

    @staticmethod
    def from_policy(policy_dir: Path, seed: int, max_seq_len: int, initial_head: Path | None = None):
        """A new head ~ N(0, 1/(hidden + 1)), bias 0 (reward_model.rs: from_policy). `initial_head` starts from a
        saved head instead (to reproduce another run exactly, e.g. the in-process trainer's)."""
        lm = common.load_policy(policy_dir)
        hidden = int(lm.config.hidden_size)
        meta = {
            "kind": META_KIND, "format_version": 1, "head_file": HEAD_FILE, "hidden_size": hidden,
            "append_eos": True, "max_seq_len": min(max_seq_len, common.max_positions(lm)), "bias_offset": 0.0,
            "demonstrations": 0, "source_policy": str(policy_dir),
        }
        rm = RewardModel(lm, meta, policy_dir)
        with torch.no_grad():
            if initial_head is not None:
                rm.load_head(initial_head)
            else:
                generator = torch.Generator().manual_seed(seed)
                std = 1.0 / math.sqrt(hidden + 1)
                rm.score.weight.copy_(torch.randn((1, hidden), generator=generator) * std)
                rm.score.bias.zero_()
        return rm

    @staticmethod
    def load(directory: Path) -> "RewardModel":
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise JobError(f"{directory}: no {META_FILE}: not a reward model")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != META_KIND or meta.get("format_version") != 1:
            raise JobError(f"{meta_path}: not a reward model")
        rm = RewardModel(common.load_policy(directory), meta, directory)
        rm.load_head(directory / meta.get("head_file", HEAD_FILE))
        return rm

    def load_head(self, path: Path) -> None:
        head = load_file(str(path))
        hidden = self.meta["hidden_size"]
        weight, bias = head.get("score.weight"), head.get("score.bias")
        if weight is None or bias is None or tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
            raise JobError(f"{path}: expected score.weight [1, {hidden}] and score.bias [1]")
        with torch.no_grad():
            self.score.weight.copy_(weight.float())
            self.score.bias.copy_(bias.float())

    def encode(self, prompt: str, response: str) -> tuple[list[int], bool]:
        ids, _ = common.encode_chat(self.tokenizer, self.eos, prompt, response, self.meta["append_eos"])
        cut = len(ids) > self.meta["max_seq_len"]
        return (ids[-self.meta["max_seq_len"] :] if cut else ids), cut

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model(input_ids=input_ids).last_hidden_state

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """[B] rewards: the head at position `last[b]` of each right-padded row."""
        hidden = self.hidden_states(input_ids)
        return self.score(hidden[torch.arange(input_ids.shape[0]), last]).squeeze(1)

    def rewards(self, sequences: list[list[int]], module=None) -> torch.Tensor:
        """[B] rewards of sequences, right-padded into one batch; `module` is this model as Accelerate wrapped it
        (the pass must go through the wrapper for its gradient hooks)."""
        return (module or self)(*pad(sequences))

    def values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] the head at every position: PPO's value function (reward_model.rs: values)."""
        return self.score(self.hidden_states(input_ids)).squeeze(2)

    def score_pairs(self, pairs: list[tuple[str, str]], batch: int = 16) -> list[float]:
        sequences = [self.encode(p, r)[0] for p, r in pairs]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(sequences), max(batch, 1)):
                out += self.rewards(sequences[i : i + batch]).tolist()
        return out

    def center_on_demonstrations(self, demonstrations: list[dict[str, Any]], batch: int) -> float | None:
        if not demonstrations:
            return None
        scores = self.score_pairs([(d["prompt"], d["response"]) for d in demonstrations], batch)
        mean = sum(scores) / len(scores)
        with torch.no_grad():
            self.score.bias.sub_(float(torch.tensor(mean, dtype=torch.float32)))
        self.meta["bias_offset"] = float(self.meta.get("bias_offset", 0.0)) + mean
        self.meta["demonstrations"] = len(demonstrations)
        return mean

    def save(self, out_dir: Path, accelerator=None, module=None) -> None:
        """The trunk as a model directory, the head and the metadata. Under several processes every process
        calls this with `module`, the model as Accelerate wrapped it: FSDP shards the weights and gathering them
        is collective; the main process writes."""
        state, _ = common.full_state(module if module is not None else self, accelerator)
        if accelerator is not None and not accelerator.is_main_process:
            return
        trunk = common.hf_tensors({k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")},
                                  self.lm.config)
        common.save_model_dir(trunk, self.source_dir, out_dir)
        head = {name: state[name].detach().float().contiguous().cpu() for name in ("score.weight", "score.bias")}
        tmp = out_dir / f".{HEAD_FILE}.tmp"
        save_file(head, str(tmp))
        os.replace(tmp, out_dir / HEAD_FILE)
        common.write_json(out_dir / META_FILE, self.meta)


def pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise JobError("cannot score an empty sequence")
    t = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), t), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in sequences])


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """losses/reward.rs: ranking_pairs. Every (w, l) with ranks[w] < ranks[l]; ties form no pair."""
    return [(w, l) for w, rw in enumerate(ranks) for l, rl in enumerate(ranks) if rw < rl]


def ranking_loss(rewards: torch.Tensor, rankings: list[dict[str, Any]],
                 margin_per_rank: float = 0.0) -> tuple[torch.Tensor, float, int]:
    """losses/reward.rs: ranking_loss_with. The weighted mean over prompts of each prompt's mean
    -log σ(r_w - r_l - m·(gap - 1)) over its ordered pairs (gap = ranks[l] - ranks[w]; m = `margin_per_rank`,
    0 = the paper's loss); the pooled pair accuracy (r_w > r_l, no margin) and the pair count."""
    winners, losers, weights, margins = [], [], [], []
    offset, weight_sum = 0, 0.0
    for r in rankings:
        pairs = ranking_pairs(r["ranks"])
        if pairs:
            w = max(float(r["weight"]), 0.0)
            weight_sum += w
            for a, b in pairs:
                winners.append(offset + a)
                losers.append(offset + b)
                weights.append(w / len(pairs))
                margins.append(margin_per_rank * (r["ranks"][b] - r["ranks"][a] - 1))
        offset += len(r["ranks"])
    if not winners:
        raise JobError("no ordered pair in the batch")
    diff = rewards[torch.tensor(winners)] - rewards[torch.tensor(losers)]
    w = torch.tensor(weights, dtype=torch.float32) / max(weight_sum, 1e-300)
    # Margins computed in float64 and rounded once to float32, as the in-process trainer does; none at m = 0.
    separated = diff - torch.tensor(margins, dtype=torch.float32) if margin_per_rank > 0 else diff
    loss = -(torch.nn.functional.logsigmoid(separated) * w).sum()
    correct = float((diff.detach() > 0).float().sum())
    return loss, correct / len(winners), len(winners)


def encode_rankings(rm: RewardModel, examples, split: str, counts: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for ex in examples:
        if ex.get("split") != split:
            continue
        ranks = [int(r) for r in ex["ranks"]]
        if len(ex["completions"]) != len(ranks) or not ranking_pairs(ranks):
            counts["skipped"] += 1
            continue
        sequences = []
        for completion in ex["completions"]:
            ids, cut = rm.encode(ex["prompt"], completion)
            counts["truncated"] += int(cut)
            sequences.append(ids)
        out.append({"sequences": sequences, "ranks": ranks, "pairs": len(ranking_pairs(ranks)),
                    "weight": float(ex.get("weight", 1.0))})
    return out


def micro_rewards(rm: RewardModel, micro, module=None) -> torch.Tensor:
    return rm.rewards([s for r in micro for s in r["sequences"]], module)


def evaluate(rm: RewardModel, rankings, micro_batch: int, margin_per_rank: float = 0.0) -> dict[str, float]:
    """reward_model.rs: evaluate. Mean per-prompt ranking loss (unweighted, with the training margin, so the
    kept epoch is chosen by the trained objective) and pooled pair accuracy."""
    loss_sum, correct, pairs = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rankings), micro_batch):
            chunk = rankings[i : i + micro_batch]
            unweighted = [{**r, "weight": 1.0} for r in chunk]
            loss, accuracy, n = ranking_loss(micro_rewards(rm, chunk), unweighted, margin_per_rank)
            loss_sum += float(loss) * len(chunk)
            correct += accuracy * n
            pairs += n
    return {"prompts": len(rankings), "pairs": pairs, "loss": loss_sum / max(len(rankings), 1),
            "accuracy": correct / max(pairs, 1)}


def train_step(rm, model, params, rankings, config, optimizer, lr, accelerator) -> dict[str, float]:
    """reward_model.rs: train_step. Prompt-weighted gradient accumulation over micro-batches of prompts."""
    micro = config["micro_batch_prompts"]
    chunks = [rankings[i : i + micro] for i in range(0, len(rankings), micro)]
    total = sum(r["weight"] for r in rankings)
    world = accelerator.num_processes
    mine = common.shares(len(chunks), world, accelerator.process_index)
    loss_sum, correct, pairs = 0.0, 0.0, 0
    for k, index in enumerate(mine):
        chunk = chunks[index if index >= 0 else 0]
        loss, accuracy, n = ranking_loss(micro_rewards(rm, chunk, model), chunk, config["margin_per_rank"])
        weight = 0.0 if index < 0 else sum(r["weight"] for r in chunk) / max(total, 1e-300)
        if index >= 0:
            loss_sum += float(loss.detach()) * weight
            correct += accuracy * n
            pairs += n
        sync = k == len(mine) - 1
        context = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
        with context:
            accelerator.backward(loss * (weight * world))
    if world > 1:
        reduced = accelerator.reduce(torch.tensor([loss_sum, correct, float(pairs)]), reduction="sum")
        loss_sum, correct, pairs = float(reduced[0]), float(reduced[1]), int(reduced[2])
    grad_norm = common.clip_gradients(params, config["max_grad_norm"], accelerator)
    common.set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "correct": correct, "pairs": pairs, "grad_norm": grad_norm, "lr": lr}


def run(env: common.JobEnv, accelerator) -> dict[str, Any]:
    started = time.time()
    config = common.stage_config(DEFAULTS, env.hyperparameters)
    if config["epochs"] <= 0 or config["batch_prompts"] <= 0 or config["micro_batch_prompts"] <= 0:
        raise JobError("RM config: epochs, batch_prompts and micro_batch_prompts must be positive")
    config["margin_per_rank"] = float(config["margin_per_rank"])
    if not (math.isfinite(config["margin_per_rank"]) and config["margin_per_rank"] >= 0):
        raise JobError("RM config: margin_per_rank must be finite and >= 0")
    data = common.Snapshot.load(env.snapshot_dir)
    initial = os.environ.get("INSTRUCTD_RM_INITIAL_HEAD")
    rm = RewardModel.from_policy(env.policy_dir, config["seed"], config["max_seq_len"],
                                 Path(initial) if initial else None)
    common.freeze_layers(rm.lm, config["freeze_layers"])
    common.add_residual_dropout(rm.lm, config["residual_dropout"])
    common.checkpoint_activations(rm.lm, config)
    counts = {"skipped": 0, "truncated": 0}
    train_set = encode_rankings(rm, data.rm, "train", counts)
    val_set = encode_rankings(rm, data.rm, "validation", counts)
    if not train_set:
        raise JobError("no training-split rankings with an ordered pair")
    rm.eval()
    val_before = evaluate(rm, val_set, config["micro_batch_prompts"], config["margin_per_rank"]) if val_set else None
    training = common.StageTraining.prepare(accelerator, rm, config, len(train_set), config["batch_prompts"])
    model, optimizer, params, schedule = training.model, training.optimizer, training.params, training.schedule
    steps_per_epoch, total_steps = training.steps_per_epoch, training.total_steps
    rng = random.Random(config["seed"] + 1)
    order = list(range(len(train_set)))
    epochs, step_log, step = [], [], 0
    best = {"epoch": 0, "loss": None, "weights": None}
    for epoch in range(1, config["epochs"] + 1):
        epoch_start = time.time()
        rng.shuffle(order)
        loss_sum, correct, pairs, last_lr = 0.0, 0.0, 0, 0.0
        rm.train()
        for i in range(0, len(order), config["batch_prompts"]):
            rankings = [train_set[j] for j in order[i : i + config["batch_prompts"]]]
            lr = schedule.lr(step)
            outcome = train_step(rm, model, params, rankings, config, optimizer, lr, accelerator)
            step_log.append({"step": step, **outcome})
            loss_sum += outcome["loss"]
            correct += outcome["correct"]
            pairs += outcome["pairs"]
            last_lr = lr
            step += 1
        rm.eval()
        val = evaluate(rm, val_set, config["micro_batch_prompts"], config["margin_per_rank"]) if val_set else None
        epochs.append({"epoch": epoch, "steps": steps_per_epoch, "train_loss": loss_sum / steps_per_epoch,
                       "train_accuracy": correct / max(pairs, 1), "val": val, "last_lr": last_lr,
                       "wall_secs": time.time() - epoch_start})
        print(f"RM epoch {epoch}: train loss {epochs[-1]['train_loss']:.4f}, val {val}", flush=True)
        if val is not None:
            if best["loss"] is None or val["loss"] < best["loss"]:
                best = {"epoch": epoch, "loss": val["loss"], "weights": None}
                if config["keep_best_epoch"] and epoch < config["epochs"]:
                    best["weights"] = {k: v.detach().clone() for k, v in rm.state_dict().items()}
            elif config["early_stop_patience"] is not None and epoch - best["epoch"] >= config["early_stop_patience"]:
                break
    last_epoch = len(epochs)
    kept_epoch = best["epoch"] if config["keep_best_epoch"] and best["epoch"] > 0 else last_epoch
    if kept_epoch != last_epoch and best["weights"] is not None:
        rm.load_state_dict(best["weights"])

    demos = [d for d in data.sft if d.get("split") == "train"]
    bias_offset = rm.center_on_demonstrations(demos, config["score_batch_size"])
    demo_mean_after = None
    if bias_offset is not None:
        scores = rm.score_pairs([(d["prompt"], d["response"]) for d in demos], config["score_batch_size"])
        demo_mean_after = sum(scores) / len(scores)
    rm.save(env.output_dir, accelerator, model)
    val_kept = epochs[kept_epoch - 1]["val"] if kept_epoch >= 1 else None
    report = {
        "epochs": epochs, "kept_epoch": kept_epoch, "val": val_kept, "val_before": val_before,
        "bias_offset": bias_offset, "demo_mean_after": demo_mean_after, "demonstrations": len(demos),
        "train_prompts": len(train_set), "val_prompts": len(val_set), **counts, "total_steps": total_steps,
        "wall_secs": time.time() - started, "config": config, "steps": step_log,
    }
    if accelerator.is_main_process:
        common.write_json(env.output_dir / "rm_report.json", report)
    return {
        "val_accuracy_before": val_before["accuracy"] if val_before else None,
        "val_accuracy": val_kept["accuracy"] if val_kept else None,
        "val_pairs": val_kept["pairs"] if val_kept else None,
        "val_accuracy_per_epoch": [e["val"]["accuracy"] if e["val"] else None for e in epochs],
        "train_accuracy_per_epoch": [e["train_accuracy"] for e in epochs],
        "kept_epoch": kept_epoch,
        "demonstration_bias": bias_offset,
        "train_prompts": len(train_set),
        "val_prompts": len(val_set),
        "wall_secs": report["wall_secs"],
        "steps": step_log,
    }


def epoch_selector(env: common.JobEnv, data: common.Snapshot):
    """SFT's epoch score when a reward model is given (backend.rs: mean_reward): the mean RM score of the
    model's samples on validation prompts (else test), with the evaluation gate's sampling settings."""
    scorer = RewardModel.load(env.reward_model_dir)
    scorer.eval()
    settings = {"max_prompts": 64, "max_new_tokens": 64, "temperature": 0.7, "seed": 0, **env.evaluation}
    prompts = [p["prompt"] for p in data.prompts if p.get("split") == "validation"]
    if not prompts:
        prompts = [p["prompt"] for p in data.prompts if p.get("split") == "test"]
    prompts = prompts[: max(int(settings["max_prompts"]), 1)]

    def select(model) -> float:
        if not prompts:
            return 0.0
        from .ppo import sample

        tokenizer = scorer.tokenizer
        episodes = sample(model, tokenizer, scorer.eos, prompts, int(settings["max_new_tokens"]),
                          float(settings["temperature"]), int(settings["seed"]), 512)
        scores = scorer.score_pairs([(prompts[e["prompt_index"]], e["text"]) for e in episodes])
        return sum(scores) / max(len(scores), 1)

    return select
