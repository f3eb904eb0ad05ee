"""Supervised fine-tuning, as trainer/src/sft.rs does it: next-token NLL on the response and EOS tokens only
(token mean over the whole step), right-padded batches, micro-batches accumulated token-weighted, cosine decay
to `final_lr_ratio` of the peak, Adam β = (0.9, 0.95), gradient clipping, validation loss after every epoch and
the best epoch saved (lowest validation loss; the highest reward-model score of its samples when a reward model
is given; the last epoch without validation data)."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import torch

from . import common
from .common import JobError

DEFAULTS = {
    "epochs": 4,
    "learning_rate": 5e-5,
    "final_lr_ratio": 0.1,
    "warmup_steps": 0,
    "batch_size": 8,
    "micro_batch_size": 8,
    "residual_dropout": 0.0,
    "max_seq_len": 512,
    "max_grad_norm": 1.0,
    "adam": {},
    "seed": 0,
    "save_every_epoch": False,
    "freeze_layers": 0,
}


def encode_split(tokenizer, eos: int, examples, split: str, max_len: int, stats: dict[str, int]):
    """sft.rs: encode_split / encode_example. Cut to `max_len` (losing the end of the response); skipped when the
    prompt alone leaves no room."""
    out = []
    for e in examples:
        if e.get("split") != split:
            continue
        ids, prompt_len = common.encode_chat(tokenizer, eos, e["prompt"], e["response"], True)
        if prompt_len == 0 or prompt_len >= max_len:
            stats["skipped"] += 1
            continue
        if len(ids) > max_len:
            ids = ids[:max_len]
            stats["truncated"] += 1
        out.append((ids, prompt_len))
    return out


def loss_tokens(example) -> int:
    ids, prompt_len = example
    return len(ids) - prompt_len


def micro_loss(model, examples) -> tuple[torch.Tensor, int]:
    """sft.rs: Collated::loss. Token-mean NLL of the positions whose next token is a response token."""
    t = max(len(ids) - 1 for ids, _ in examples)
    input_ids = torch.zeros((len(examples), t), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, (ids, prompt_len) in enumerate(examples):
        n = len(ids) - 1
        input_ids[b, :n] = torch.tensor(ids[:n])
        for pos in range(prompt_len - 1, n):
            rows.append(b)
            cols.append(pos)
            targets.append(ids[pos + 1])
    # Through the (possibly wrapped) model's own forward, so data-parallel and sharded wrappers see the pass.
    logits = model(input_ids=input_ids).logits[torch.tensor(rows), torch.tensor(cols)].float()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="mean")
    return loss, len(targets)


def mean_loss(model, examples, batch_size: int) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = micro_loss(model, examples[i : i + batch_size])
            total += float(loss) * n
            tokens += n
    return total / max(tokens, 1)


def train_step(model, params, batch, config, optimizer, lr, accelerator) -> dict[str, float]:
    """sft.rs: train_step. One optimiser step; returns the loss (before the update) and the norm before clipping."""
    total_tokens = sum(loss_tokens(e) for e in batch)
    micro = config["micro_batch_size"]
    chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = common.shares(len(chunks), world, rank)
    step_loss = 0.0
    for k, index in enumerate(mine):
        chunk = chunks[index if index >= 0 else 0]
        loss, tokens = micro_loss(model, chunk)
        weight = 0.0 if index < 0 else tokens / max(total_tokens, 1)
        if index >= 0:
            step_loss += float(loss.detach()) * weight
        # Data-parallel wrappers average gradients over processes: scale up so the sum is the batch's gradient.
        sync = k == len(mine) - 1
        context = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
        with context:
            accelerator.backward(loss * (weight * world))
    if world > 1:
        step_loss = float(accelerator.reduce(torch.tensor(step_loss), reduction="sum"))
    grad_norm = common.clip_gradients(params, config["max_grad_norm"], accelerator)
    common.set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "grad_norm": grad_norm, "tokens": total_tokens, "lr": lr}


def run(env: common.JobEnv, accelerator) -> dict[str, Any]:
    started = time.time()
    config = common.stage_config(DEFAULTS, env.hyperparameters)
    if config["epochs"] <= 0 or config["batch_size"] <= 0 or config["micro_batch_size"] <= 0:
        raise JobError("SFT config: epochs, batch_size and micro_batch_size must be positive")
    data = common.Snapshot.load(env.snapshot_dir)
    tokenizer = common.load_tokenizer(env.policy_dir)
    eos = common.eos_id(tokenizer, env.policy_dir)
    model = common.load_policy(env.policy_dir)
    common.freeze_layers(model, config["freeze_layers"])
    common.add_residual_dropout(model, config["residual_dropout"])
    common.checkpoint_activations(model, config)
    max_len = min(config["max_seq_len"], common.max_positions(model))
    stats = {"truncated": 0, "skipped": 0}
    train_set = encode_split(tokenizer, eos, data.sft, "train", max_len, stats)
    val_set = encode_split(tokenizer, eos, data.sft, "validation", max_len, stats)
    if not train_set:
        raise JobError("no training-split demonstrations to fine-tune on")
    training = common.StageTraining.prepare(accelerator, model, config, len(train_set), config["batch_size"])
    model, optimizer, params, schedule = training.model, training.optimizer, training.params, training.schedule
    steps_per_epoch, total_steps = training.steps_per_epoch, training.total_steps
    rng = random.Random(config["seed"])
    selector = None
    if env.reward_model_dir is not None:
        from .reward_model import epoch_selector

        selector = epoch_selector(env, data)
    selected_by = "selector" if selector else ("validation_loss" if val_set else "last_epoch")

    epochs, step_log, best, step = [], [], None, 0
    order = list(range(len(train_set)))
    for epoch in range(1, config["epochs"] + 1):
        epoch_start = time.time()
        rng.shuffle(order)
        loss_sum, tokens_sum, last_lr = 0.0, 0, 0.0
        model.train()
        for i in range(0, len(order), config["batch_size"]):
            batch = [train_set[j] for j in order[i : i + config["batch_size"]]]
            lr = schedule.lr(step)
            outcome = train_step(model, params, batch, config, optimizer, lr, accelerator)
            step_log.append({"step": step, **outcome})
            loss_sum += outcome["loss"] * outcome["tokens"]
            tokens_sum += outcome["tokens"]
            last_lr = lr
            step += 1
        model.eval()
        val_loss = mean_loss(model, val_set, config["micro_batch_size"]) if val_set else None
        record = {"epoch": epoch, "steps": steps_per_epoch, "train_loss": loss_sum / max(tokens_sum, 1),
                  "val_loss": val_loss, "score": None, "last_lr": last_lr, "train_tokens": tokens_sum}
        if selector is not None:
            record["score"] = score = selector(accelerator.unwrap_model(model))
        else:
            score = -val_loss if val_loss is not None else float(epoch)
        if best is None or score > best[0]:
            best = (score, epoch, common.state_tensors(model, accelerator))
        if config["save_every_epoch"]:
            tensors = common.state_tensors(model, accelerator)
            if accelerator.is_main_process:
                common.save_model_dir(tensors, env.policy_dir, env.output_dir / f"epoch-{epoch:02d}")
        record["wall_secs"] = time.time() - epoch_start
        epochs.append(record)
        print(f"SFT epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {val_loss}", flush=True)

    _, best_epoch, weights = best
    if accelerator.is_main_process:
        common.save_model_dir(weights, env.policy_dir, env.output_dir)
    report = {
        "epochs": epochs, "best_epoch": best_epoch, "selected_by": selected_by,
        "train_examples": len(train_set), "val_examples": len(val_set), **stats, "total_steps": total_steps,
        "wall_secs": time.time() - started, "config": config, "steps": step_log,
    }
    if accelerator.is_main_process:
        common.write_json(env.output_dir / "sft.json", report)
    return {
        "selected_by": selected_by,
        "epoch_scores": [e["score"] for e in epochs],
        "best_epoch": best_epoch,
        "val_loss": epochs[best_epoch - 1]["val_loss"],
        "train_loss": epochs[-1]["train_loss"],
        "train_examples": len(train_set),
        "wall_secs": report["wall_secs"],
        "steps": step_log,
    }

