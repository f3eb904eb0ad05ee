"""PPO-ptx, as trainer/src/ppo.rs does it. Each iteration: rollouts from the policy's own `generate` at the
configured temperature; the reward model's scores, the old and reference log-probabilities and the value
function's estimates (a second copy of the reward model read at every position); shaped rewards with the
per-token KL penalty -β (log π_old - log π_SFT) and the score on the last response token; GAE without discount;
advantages whitened over the iteration; one pass over shuffled minibatches with the clipped policy loss plus γ
times the pre-training NLL on `ptx_per_episode` corpus windows per episode (one Adam step), an EMA of the policy
weights, and the clipped value loss with its own Adam. Warm-up from 1/10 of the peak, then constant. The EMA is
saved when `ema_decay` is set.

Data parallel over the launcher's processes, the same code on one: each process samples, scores and evaluates its
share of the iteration's prompts (every `world`-th), the iteration's statistics (reward normalisation, whitening,
the reported means, the KL controller) are taken over every process's episodes, and each minibatch's losses are
token sums over the process's rows divided by the whole minibatch's token count, so the summed gradients are the
one-process gradient and every process takes the same Adam, EMA and value steps."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from . import common
from .common import JobError
from .reward_model import RewardModel

DEFAULTS = {
    "iterations": 8,
    "episodes_per_iteration": 16,
    "minibatch_size": 8,
    "inner_epochs": 1,
    "max_new_tokens": 48,
    "max_prompt_tokens": 256,
    "temperature": 1.0,
    "learning_rate": 1e-5,
    "value_learning_rate": 1e-5,
    "warmup_iterations": 2,
    "kl_coef": 0.02,
    "kl_target": None,
    "kl_horizon": 10_000,
    "normalize_rewards": False,
    "clip_ratio": 0.2,
    "value_clip": 0.2,
    "gae_lambda": 0.95,
    "vf_coef": 1.0,
    "ptx_coef": 1.0,
    "ptx_per_episode": 1,
    "ptx_micro_batch": 8,
    "ema_decay": 0.9,
    "max_grad_norm": 1.0,
    "adam": {},
    "seed": 0,
    "freeze_layers": 0,
}
CORPUS_DEFAULTS = {"seq_len": 128, "held_out_percent": 5, "max_tokens": 2_000_000}


# ---------------------------------------------------------------------------------------------------------------
# The pre-training corpus (corpus.rs)


def plain_text(markdown: str) -> str:
    out = []
    for line in markdown.splitlines():
        line = line.rstrip().lstrip("#").lstrip()
        line = line.replace("**", "")
        if line.startswith("_") and line.endswith("_") and len(line) >= 2:
            line = line[1:-1]
        out.append(line + "\n")
    return "".join(out)


def load_corpus(directory: Path, tokenizer, settings: dict[str, Any]) -> list[list[int]]:
    """The training windows (the held-out ones are the evaluation gate's)."""
    settings = {**CORPUS_DEFAULTS, **settings}
    seq_len, percent, max_tokens = int(settings["seq_len"]), int(settings["held_out_percent"]), int(
        settings["max_tokens"])
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".md", ".txt"))
    if not paths:
        raise JobError(f"pre-training corpus {directory}: no .md or .txt files")
    train, tokens = [], 0
    for path in paths:
        if tokens >= max_tokens:
            break
        ids = tokenizer.encode(plain_text(path.read_text(encoding="utf-8")), add_special_tokens=False)
        tokens += len(ids)
        name = str(path.relative_to(directory))
        for i in range(len(ids) // seq_len):
            digest = hashlib.sha256(f"{name}\0{i}".encode()).digest()
            if int.from_bytes(digest[:2], "big") % 100 >= percent:
                train.append(list(ids[i * seq_len : (i + 1) * seq_len]))
    if not train:
        raise JobError(f"pre-training corpus {directory}: too few {seq_len}-token windows")
    return train


# ---------------------------------------------------------------------------------------------------------------
# Rollouts (episodes.rs)


def sample(model, tokenizer, eos: int, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
           max_prompt_tokens: int, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """One response per prompt with the model's own `generate` (request i seeded with seed + i); prompts too long
    to sample from are skipped. The response ends with EOS when the model stopped by itself. `indices`: only those
    prompts (a process's share); request i keeps its seed, so the processes' samples differ from each other and
    are the ones one process would draw."""
    limit = common.max_positions(model)
    episodes = []
    was_training = model.training
    model.eval()
    for i in range(len(prompts)) if indices is None else indices:
        prompt = prompts[i]
        ids = common.encode_prompt(tokenizer, prompt)
        if not ids or len(ids) > max_prompt_tokens or len(ids) + 1 >= limit:
            continue
        torch.manual_seed(seed + i)
        new = min(max_new_tokens, limit - len(ids))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                max_new_tokens=new, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=eos,
            )
        generated = out[0, len(ids) :].tolist()
        stopped = eos in generated
        response = generated[: generated.index(eos) + 1] if stopped else generated
        if not response:
            continue
        text = tokenizer.decode(response[:-1] if stopped else response, skip_special_tokens=True)
        episodes.append({"prompt_index": i, "prompt_ids": ids, "response_ids": response, "text": text,
                         "stopped": stopped})
    model.train(was_training)
    return episodes


def episode_batch(episodes) -> dict[str, Any]:
    """episodes.rs: EpisodeBatch. input/targets [B, L-1] right-padded, mask 1 where the target is a response
    token. A process may hold no episode of an iteration: then B = 0."""
    width = max((len(e["prompt_ids"]) + len(e["response_ids"]) for e in episodes), default=2)
    t = width - 1
    b = len(episodes)
    input_ids = torch.zeros((b, t), dtype=torch.long)
    targets = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    for row, e in enumerate(episodes):
        ids = e["prompt_ids"] + e["response_ids"]
        n = len(ids)
        input_ids[row, : n - 1] = torch.tensor(ids[:-1])
        targets[row, : n - 1] = torch.tensor(ids[1:])
        mask[row, len(e["prompt_ids"]) - 1 : n - 1] = 1.0
    return {"input": input_ids, "targets": targets, "mask": mask,
            "response_tokens": [len(e["response_ids"]) for e in episodes]}


# ---------------------------------------------------------------------------------------------------------------
# Losses (losses/ppo.rs, losses/mod.rs)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: float) -> torch.Tensor:
    """This process's part of the mean over a minibatch's tokens: its masked values' sum over `count`, the whole
    minibatch's token count over every process, so the processes' parts add up to the mean."""
    keep = mask != 0
    return torch.where(keep, values, torch.zeros_like(values)).sum() / max(count, 1.0)


def shaped_rewards(scores: list[float], kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    out = torch.where(mask != 0, -torch.tensor(beta, dtype=torch.float32) * kl, torch.zeros_like(kl))
    for row, score in enumerate(scores):
        idx = torch.nonzero(mask[row] != 0)
        if len(idx):
            out[row, int(idx[-1])] += score
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    b, t = rewards.shape
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    adv = [[0.0] * t for _ in range(b)]
    ret = [[0.0] * t for _ in range(b)]
    for row in range(b):
        next_value = next_adv = 0.0
        for i in reversed(range(t)):
            if m[row][i] == 0.0:
                continue
            # f32 arithmetic as the Rust side does it.
            delta = _f32(_f32(r[row][i] + _f32(gamma * next_value)) - v[row][i])
            a = _f32(delta + _f32(_f32(gamma * lam) * next_adv))
            adv[row][i] = a
            ret[row][i] = _f32(a + v[row][i])
            next_value, next_adv = v[row][i], a
    shape = (b, t)  # kept when there are no rows
    return torch.tensor(adv, dtype=torch.float32).reshape(shape), torch.tensor(ret, dtype=torch.float32).reshape(shape)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def whiten(advantages: torch.Tensor, mask: torch.Tensor, dp: "DataParallel") -> torch.Tensor:
    """Advantages whitened with the mean and variance over every response token of the iteration (every process's:
    `dp` sums the processes' parts)."""
    keep = mask != 0
    kept = advantages[keep].double()
    out = torch.zeros_like(advantages)
    total, count = dp.sum([float(kept.sum()), float(kept.numel())])
    if count:
        mean = total / count
        (squares,) = dp.sum([float(((kept - mean) ** 2).sum())])
        out[keep] = ((kept - mean) / math.sqrt(squares / count + 1e-8)).float()
    return out


def policy_loss(new_lp, old_lp, advantages, mask, clip: float, count: float):
    neg_adv = -advantages
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.detach().clamp(1.0 - clip, 1.0 + clip)
    active = clipped > unclipped.detach()
    per_token = torch.where(active, clipped, unclipped)
    loss = masked_mean(per_token, mask, count)
    clip_fraction = float(masked_mean(active.float(), mask, count))
    approx_kl = 0.5 * float(masked_mean(log_ratio.detach() ** 2, mask, count))
    return loss, clip_fraction, approx_kl


def value_loss(values, old_values, returns, mask, clip: float, count: float):
    low, high = old_values - clip, old_values + clip
    plain = values.detach()
    above = torch.where(plain > high, high, values)
    v_clipped = torch.where(plain < low, low, above)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    per_token = torch.where(clipped.detach() > unclipped.detach(), clipped, unclipped)
    return masked_mean(per_token, mask, count) * 0.5


def lm_loss(model, windows: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(windows)
    logits = model(input_ids=ids[:, :-1]).logits
    return -token_logprobs(logits, ids[:, 1:]).mean()


class KlController:
    """kl_controller.rs: adaptive β towards a target KL (Ziegler et al.), fixed without a target."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, float(max(horizon, 1))

    def update(self, kl: float, episodes: int) -> None:
        if not self.target or self.target <= 0 or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * episodes / self.horizon


class RunningMoments:
    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n = float(len(values))
        mean = sum(values) / n
        m2 = sum((v - mean) ** 2 for v in values)
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def std(self) -> float:
        return 1.0 if self.count < 2 else math.sqrt(self.m2 / (self.count - 1))

    def normalise(self, values: list[float]) -> list[float]:
        std = max(self.std(), 1e-6)
        return [(v - self.mean) / std for v in values]


# ---------------------------------------------------------------------------------------------------------------
# Data parallel

# Gradients are summed over processes in flat buffers of at most this many elements (256 MiB of F32).
GRADIENT_BUCKET = 1 << 26


class DataParallel:
    """The processes of one run (Accelerate's): which share of a list is this process's, and the collectives the
    update needs over torch.distributed. On one process every collective returns its input, so one code path
    serves any number of processes. Collectives run on Accelerate's device (NCCL takes GPU tensors only); the
    PPO models themselves stay where they were loaded."""

    def __init__(self, accelerator):
        self.world = int(accelerator.num_processes)
        self.rank = int(accelerator.process_index)
        self.device = accelerator.device

    def mine(self, n: int) -> list[int]:
        """This process's share of n items: every `world`-th from its rank."""
        return list(range(self.rank, n, self.world))

    def sum(self, values: list[float]) -> list[float]:
        """The sums over processes (F64), the same on every process."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.SUM)
        return t.cpu().tolist()

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def sum_gradients(self, params) -> None:
        """Every process's gradients replaced by their sum over processes (the losses are scaled so the sum is the
        whole minibatch's gradient), so every process clips, steps and averages the same numbers. A process
        without a gradient adds zeros; a parameter no process has a gradient for keeps none (Adam skips it, as on
        one process)."""
        if self.world == 1:
            return
        present = self.sum([float(p.grad is not None) for p in params])
        live = [p for p, n in zip(params, present) if n > 0]
        bucket, size = [], 0
        for p in live:
            if bucket and size + p.numel() > GRADIENT_BUCKET:
                self._sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, params) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.device)
                          for p in params])
        torch.distributed.all_reduce(flat, torch.distributed.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device)
            offset += n


# ---------------------------------------------------------------------------------------------------------------
# The update


class Trainer:
    """The models, optimisers and EMA of one PPO run; `update` is one iteration's optimisation on given episodes
    (the in-process trainer's steps 2-4). Every process holds all four models whole and ends each step with the
    same weights."""

    def __init__(self, env: common.JobEnv, config: dict[str, Any], accelerator):
        self.config, self.accelerator = config, accelerator
        self.dp = DataParallel(accelerator)
        self.policy = common.load_policy(env.policy_dir)
        common.freeze_layers(self.policy, config["freeze_layers"])
        common.checkpoint_activations(self.policy, config)
        self.reference = common.load_policy(env.reference_dir).eval()
        self.scorer = RewardModel.load(env.reward_model_dir).eval()
        self.critic = RewardModel.load(env.reward_model_dir)
        common.freeze_layers(self.critic.lm, config["freeze_layers"])
        common.checkpoint_activations(self.critic.lm, config)
        if self.reference.config.vocab_size != self.policy.config.vocab_size:
            raise JobError("the reference policy's vocabulary differs from the policy's")
        self.tokenizer = common.load_tokenizer(env.policy_dir)
        self.eos = common.eos_id(self.tokenizer, env.policy_dir)
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.policy_adam = common.adam(self.policy_params, config["adam"])
        self.critic_adam = common.adam(self.critic_params, config["adam"])
        self.ema = None
        if config["ema_decay"] is not None:
            self.ema = {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        self.kl = KlController(config["kl_coef"], config["kl_target"], config["kl_horizon"])
        self.moments = RunningMoments()
        self.schedule = common.LrSchedule(config["learning_rate"], config["warmup_iterations"], 0, None)
        self.value_schedule = common.LrSchedule(config["value_learning_rate"], config["warmup_iterations"], 0, None)

    def rows(self, episodes) -> list[int]:
        """The places of this process's episodes in the iteration's list as one process would hold it (every
        process's episodes in prompt order)."""
        everyone = sorted(i for part in self.dp.gather([e["prompt_index"] for e in episodes]) for i in part)
        place = {index: row for row, index in enumerate(everyone)}
        return [place[e["prompt_index"]] for e in episodes]

    def update(self, iteration: int, prompts: list[str], episodes, rng: random.Random, corpus, step_log,
               rows: list[int]) -> dict:
        """One iteration's update. `episodes` are this process's share and `rows` their places in the whole
        iteration's list (which the minibatch order indexes); on one process all of them, in order. Every process
        must call this, with the same `rng` state, even with no episode."""
        c = self.config
        lr, value_lr = self.schedule.lr(iteration - 1), self.value_schedule.lr(iteration - 1)
        scores = self.scorer.score_pairs([(prompts[e["prompt_index"]], e["text"]) for e in episodes])
        batch = episode_batch(episodes)
        table = self._iteration_table(rows, scores, batch["response_tokens"], [e["stopped"] for e in episodes])
        shaped_scores = scores
        if c["normalize_rewards"]:
            if iteration == 1:
                # Every process's scores in row order: the same moments and critic head everywhere. Before the
                # old values are read, so they are on the normalised scale too.
                self.moments.update(table["scores"])
                std = max(self.moments.std(), 1e-6)
                with torch.no_grad():
                    self.critic.score.weight.mul_(1.0 / std)
                    self.critic.score.bias.mul_(1.0 / std).add_(-self.moments.mean / std)
            shaped_scores = self.moments.normalise(scores)
        mb = c["minibatch_size"]
        with torch.no_grad():
            def chunks(fn):
                parts = [fn(batch["input"][i : i + mb], batch["targets"][i : i + mb])
                         for i in range(0, len(episodes), mb)]
                return torch.cat(parts) if parts else torch.zeros(batch["mask"].shape)

            old_lp = chunks(lambda x, y: token_logprobs(self.policy(input_ids=x).logits, y))
            ref_lp = chunks(lambda x, y: token_logprobs(self.reference(input_ids=x).logits, y))
            old_values = chunks(lambda x, _y: self.critic.values(x))
        kl = old_lp - ref_lp
        (kl_sum,) = self.dp.sum([sum((kl * batch["mask"]).sum(1).tolist())])
        rewards = shaped_rewards(shaped_scores, kl, batch["mask"], self.kl.beta)
        advantages, returns = gae(rewards, old_values, batch["mask"], 1.0, c["gae_lambda"])
        advantages = whiten(advantages, batch["mask"], self.dp)
        experience = {"batch": batch, "old_lp": old_lp, "old_values": old_values, "advantages": advantages,
                      "returns": returns, "local": {row: i for i, row in enumerate(rows)}}

        n = len(table["scores"])
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "ptx_loss": None, "clip_fraction": 0.0, "approx_kl": 0.0,
                "entropy": 0.0, "steps": 0}
        for _ in range(c["inner_epochs"]):
            shuffled = list(range(n))
            rng.shuffle(shuffled)
            for start in range(0, n, mb):
                chosen = shuffled[start : start + mb]
                windows = None
                if corpus is not None:
                    count = max(c["ptx_per_episode"], 1) * len(chosen)
                    windows = [corpus[rng.randrange(len(corpus))] for _ in range(count)]
                step = self._step(experience, chosen, sum(table["tokens"][r] for r in chosen), windows, lr,
                                  value_lr)
                step_log.append({"iteration": iteration, **step})
                sums["steps"] += 1
                for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy"):
                    sums[key] += step[key]
                if step["ptx_loss"] is not None:
                    sums["ptx_loss"] = (sums["ptx_loss"] or 0.0) + step["ptx_loss"]
        steps = max(sums["steps"], 1)
        all_scores = table["scores"]
        reward_mean = sum(all_scores) / n
        record = {
            "iteration": iteration, "episodes": n, "reward_mean": reward_mean,
            "reward_std": math.sqrt(sum((s - reward_mean) ** 2 for s in all_scores) / n), "kl_coef": self.kl.beta,
            "kl": kl_sum / n, "entropy": sums["entropy"] / steps,
            "clip_fraction": sums["clip_fraction"] / steps, "approx_kl": sums["approx_kl"] / steps,
            "policy_loss": sums["policy_loss"] / steps, "value_loss": sums["value_loss"] / steps,
            "ptx_loss": None if sums["ptx_loss"] is None else sums["ptx_loss"] / steps, "lr": lr,
            "response_tokens_mean": sum(table["tokens"]) / n,
            "stopped_fraction": sum(1 for s in table["stopped"] if s) / n,
        }
        self.kl.update(record["kl"], n)
        return record

    def _iteration_table(self, rows, scores, tokens, stopped) -> dict[str, list]:
        """Every process's episodes' score, response length and stop, in row order (the iteration's statistics
        are over all of them)."""
        parts = self.dp.gather(list(zip(rows, scores, tokens, stopped)))
        merged = sorted((x for part in parts for x in part), key=lambda x: x[0])
        if [x[0] for x in merged] != list(range(len(merged))):
            raise JobError("PPO: the processes' episodes do not cover the iteration's rows once each")
        if not merged:
            raise JobError("PPO: an iteration without episodes")
        return {"scores": [x[1] for x in merged], "tokens": [x[2] for x in merged], "stopped": [x[3] for x in merged]}

    def _step(self, experience, chosen: list[int], tokens: int, windows, lr: float, value_lr: float) -> dict:
        """One minibatch (`chosen`: its rows, on every process; `tokens`: its response tokens): this process's
        rows' losses over the whole minibatch's token count and its share of the ptx windows, the gradients summed
        over processes, one Adam step, the EMA, then the same for the value function."""
        c, dp = self.config, self.dp
        local = [experience["local"][r] for r in chosen if r in experience["local"]]
        idx = torch.tensor(local, dtype=torch.long)
        batch = experience["batch"]
        x, y, m = batch["input"][idx], batch["targets"][idx], batch["mask"][idx]
        # This process's parts of the minibatch's figures; summed over processes below.
        parts = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "entropy": 0.0, "ptx_loss": 0.0,
                 "value_loss": 0.0}
        if local:
            logits = self.policy(input_ids=x).logits
            new_lp = token_logprobs(logits, y)
            p_loss, parts["clip_fraction"], parts["approx_kl"] = policy_loss(
                new_lp, experience["old_lp"][idx], experience["advantages"][idx], m, c["clip_ratio"], tokens)
            parts["entropy"] = float(masked_mean(entropy(logits.detach()), m, tokens))
            p_loss.backward()
            parts["policy_loss"] = float(p_loss.detach())
            del logits, new_lp, p_loss
        if windows:
            # The windows' micro-batches dealt round the processes, each weighted by its share of the windows.
            micro = c["ptx_micro_batch"]
            starts = list(range(0, len(windows), micro))
            for k in dp.mine(len(starts)):
                chunk = windows[starts[k] : starts[k] + micro]
                share = len(chunk) / len(windows)
                nll = lm_loss(self.policy, chunk)
                parts["ptx_loss"] += float(nll.detach()) * share
                (nll * (c["ptx_coef"] * share)).backward()
        dp.sum_gradients(self.policy_params)
        grad_norm = common.clip_gradients(self.policy_params, c["max_grad_norm"])
        common.set_lr(self.policy_adam, lr)
        self.policy_adam.step()
        self.policy_adam.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = c["ema_decay"]
            with torch.no_grad():
                for name, p in self.policy.named_parameters():
                    if name in self.ema:
                        self.ema[name].mul_(decay).add_(p.detach() * (1.0 - decay))

        if local:
            values = self.critic.values(x)
            v_loss = value_loss(values, experience["old_values"][idx], experience["returns"][idx], m,
                                c["value_clip"], tokens)
            (v_loss * c["vf_coef"]).backward()
            parts["value_loss"] = float(v_loss.detach())
        dp.sum_gradients(self.critic_params)
        value_grad_norm = common.clip_gradients(self.critic_params, c["max_grad_norm"])
        common.set_lr(self.critic_adam, value_lr)
        self.critic_adam.step()
        self.critic_adam.zero_grad(set_to_none=True)

        totals = dict(zip(parts, dp.sum(list(parts.values()))))
        return {"policy_loss": totals["policy_loss"], "ptx_loss": totals["ptx_loss"] if windows else None,
                "value_loss": totals["value_loss"], "grad_norm": grad_norm, "value_grad_norm": value_grad_norm,
                "clip_fraction": totals["clip_fraction"], "approx_kl": totals["approx_kl"],
                "entropy": totals["entropy"], "lr": lr}

    def final_tensors(self) -> dict[str, torch.Tensor]:
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self.policy.named_parameters():
                    if name in self.ema:
                        p.copy_(self.ema[name])
        return common.state_tensors(self.policy)


def run(env: common.JobEnv, accelerator) -> dict[str, Any]:
    started = time.time()
    config = common.stage_config(DEFAULTS, env.hyperparameters)
    if env.reference_dir is None or env.reward_model_dir is None:
        raise JobError("PPO needs INSTRUCTD_REFERENCE_DIR and INSTRUCTD_REWARD_MODEL_DIR")
    data = common.Snapshot.load(env.snapshot_dir)
    prompts = [p["prompt"] for p in data.prompts if p.get("split") == "train"]
    if not prompts:
        raise JobError("no training prompts to sample rollouts from")
    trainer = Trainer(env, config, accelerator)
    dp = trainer.dp
    corpus = None
    if config["ptx_coef"] > 0:
        if env.corpus_dir is None:
            raise JobError("ptx_coef > 0 needs a pre-training corpus (INSTRUCTD_CORPUS_DIR)")
        corpus = load_corpus(env.corpus_dir, trainer.tokenizer, env.corpus)
    # The same generator on every process: the same prompts, minibatch orders and ptx windows everywhere.
    rng = random.Random(config["seed"])
    order = list(range(len(prompts)))
    rng.shuffle(order)
    cursor = 0
    iterations, step_log = [], []
    for iteration in range(1, config["iterations"] + 1):
        it_start = time.time()
        batch_prompts = []
        for _ in range(config["episodes_per_iteration"]):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            cursor += 1
            batch_prompts.append(prompts[order[cursor - 1]])
        seed = (config["seed"] * 1_000_003 + iteration * 65_537) % (1 << 63)
        episodes = sample(trainer.policy, trainer.tokenizer, trainer.eos, batch_prompts, config["max_new_tokens"],
                          config["temperature"], seed, config["max_prompt_tokens"], dp.mine(len(batch_prompts)))
        rows = trainer.rows(episodes)
        rollout_secs = time.time() - it_start
        if not dp.sum([float(len(episodes))])[0]:
            raise JobError(f"no prompt fits in max_prompt_tokens = {config['max_prompt_tokens']} to sample from")
        record = trainer.update(iteration, batch_prompts, episodes, rng, corpus, step_log, rows)
        record.update({"rollout_secs": rollout_secs, "wall_secs": time.time() - it_start})
        iterations.append(record)
        if accelerator.is_main_process:
            print(f"PPO iteration {iteration}: reward {record['reward_mean']:.4f}, kl {record['kl']:.4f}", flush=True)
    # Every process holds the same weights: the main process writes them.
    tensors = trainer.final_tensors()
    report = {"iterations": iterations, "train_prompts": len(prompts), "saved_ema": trainer.ema is not None,
              "wall_secs": time.time() - started, "config": config, "steps": step_log}
    if accelerator.is_main_process:
        common.save_model_dir(tensors, env.policy_dir, env.output_dir)
        common.write_json(env.output_dir / "ppo.json", report)
    return {"iterations": iterations, "saved_ema": trainer.ema is not None, "train_prompts": len(prompts),
            "wall_secs": report["wall_secs"], "steps": step_log}


def probe(env: common.JobEnv, accelerator, episodes_file: Path) -> dict[str, Any]:
    """One PPO iteration's update on episodes and pre-training windows given in a JSON file (token ids, texts,
    the minibatch order and windows), for checking against the in-process trainer number for number. On several
    processes each takes every `world`-th given episode, as `run` deals prompts; the numbers are the whole
    iteration's, the same on every process."""
    config = common.stage_config(DEFAULTS, env.hyperparameters)
    spec = json.loads(episodes_file.read_text())
    trainer = Trainer(env, config, accelerator)

    class Replay(random.Random):
        """Hands out the given minibatch order and window indices instead of random ones."""

        def __init__(self):
            super().__init__(0)
            self.windows = list(spec["window_indices"])

        def shuffle(self, x):  # noqa: D401 - the given order
            x[:] = spec["order"]

        def randrange(self, _n):
            return self.windows.pop(0)

    step_log: list[dict[str, Any]] = []
    mine = trainer.dp.mine(len(spec["episodes"]))
    record = trainer.update(1, spec["prompts"], [spec["episodes"][i] for i in mine], Replay(), spec.get("windows"),
                            step_log, mine)
    return {"iteration": record, "steps": step_log, "processes": trainer.dp.world}
