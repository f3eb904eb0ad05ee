"""The PyTorch side of `bench/train/compare.sh`: the trainer's steps, written the way a strong PyTorch user would.

One row per process (like `instructd bench-train --row`), so its peak RSS is its own. Prints one JSON line in
the same schema as `instructd bench-train --json`:

    python torch_peer.py --model models/smollm2-135m-instruct --row sft:4x128:0 --rounds 3 --warmup 1

Rows:
  sft:NxT:F  N sequences of T input tokens, the first quarter prompt, next-token loss on the rest, computed on the
             loss positions' hidden states only (no [T, vocab] logits for the prompt), Adam (0.9, 0.95), clip 1.0.
  rm:KxT:F   one prompt's K completions of T tokens: the trunk, a scalar head on the last token, -log σ(r_i - r_j)
             over all K(K-1)/2 ordered pairs, Adam, clip 1.0.
  ppo:ExG:F  one PPO-ptx iteration as instructd runs it: E rollouts of G sampled tokens (generate), the four
             scoring forwards (reward, policy, reference, value), shaped rewards, GAE, whitening, then per
             minibatch the clipped policy loss, the pre-training loss (one 128-token window per episode) and the
             clipped value loss, each with its own backward and Adam step.
F freezes the embedding and the lowest F layers (requires_grad False), as instructd's `freeze_layers`.
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

PASSAGE = (
    "The history of the printing press begins with the need to copy texts faster than scribes could. Movable "
    "type, ink that clung to metal, and a press adapted from those used for wine and olive oil came together in "
    "the fifteenth century. Within fifty years presses operated in hundreds of towns, books became cheaper, and "
    "ideas travelled further and faster than ever before. "
)


def sequences(tok, length, count):
    passage = tok(PASSAGE * (length // 40 + 2), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        ids = tok(f"Example {i}. ", add_special_tokens=False)["input_ids"] + passage
        out.append(ids[:length])
    return torch.tensor(out, dtype=torch.long)


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    return model


def freeze(model, layers):
    if layers <= 0:
        return
    model.model.embed_tokens.weight.requires_grad_(False)
    for layer in model.model.layers[:layers]:
        for p in layer.parameters():
            p.requires_grad_(False)


def adam(params):
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=1e-6, betas=(0.9, 0.95), eps=1e-8, fused=True)


class Phases:
    def __init__(self):
        self.t = {"forward": 0.0, "backward": 0.0, "gradients": 0.0, "optimizer": 0.0, "rollout": 0.0}

    def time(self, phase, f):
        start = time.perf_counter()
        out = f()
        self.t[phase] += time.perf_counter() - start
        return out


def cpu_secs():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sft_step(model, opt, batch, prompt_len):
    ph = Phases()
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def forward():
        hidden = model.model(input_ids=inputs).last_hidden_state
        picked = hidden[:, prompt_len - 1 :].reshape(-1, hidden.shape[-1])
        logits = model.lm_head(picked)
        return F.cross_entropy(logits, targets[:, prompt_len - 1 :].reshape(-1))

    loss = ph.time("forward", forward)
    ph.time("backward", loss.backward)
    ph.time("gradients", lambda: torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0))
    ph.time("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return ph.t


def rm_step(trunk, head, opt, batch):
    ph = Phases()
    k = batch.shape[0]

    def forward():
        hidden = trunk(input_ids=batch).last_hidden_state[:, -1]
        r = head(hidden).squeeze(-1)
        i, j = torch.triu_indices(k, k, offset=1)
        return -F.logsigmoid(r[i] - r[j]).mean()

    loss = ph.time("forward", forward)
    ph.time("backward", loss.backward)
    ph.time("gradients", lambda: torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0))
    ph.time("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return ph.t


def token_logprobs(logits, targets):
    return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


class Ppo:
    """instructd's PPO-ptx iteration (trainer/src/ppo.rs) on PyTorch modules."""

    def __init__(self, model_dir, tok, episodes, minibatch, new_tokens, frozen):
        self.tok = tok
        self.policy = load(model_dir)
        self.reference = load(model_dir).eval()
        base = load(model_dir)
        self.scorer, self.critic = base.model, load(model_dir).model
        hidden = base.config.hidden_size
        self.scorer_head = torch.nn.Linear(hidden, 1)
        self.critic_head = torch.nn.Linear(hidden, 1)
        self.critic_head.load_state_dict(self.scorer_head.state_dict())
        freeze(self.policy, frozen)
        for layer in [self.critic.embed_tokens] + list(self.critic.layers[:frozen]):
            for p in layer.parameters():
                p.requires_grad_(False)
        self.policy_opt = adam(self.policy.parameters())
        self.critic_opt = adam(list(self.critic.parameters()) + list(self.critic_head.parameters()))
        self.episodes, self.minibatch, self.new_tokens = episodes, minibatch, new_tokens
        chat = [
            tok.apply_chat_template(
                [{"role": "user", "content": f"Write a few sentences about printing, part {i}."}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in range(episodes)
        ]
        tok.padding_side = "left"
        self.prompts = tok(chat, return_tensors="pt", padding=True, add_special_tokens=False)
        self.windows = sequences(tok, 129, episodes)

    def iteration(self):
        ph = Phases()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.policy.generate(
                **self.prompts, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=self.new_tokens, pad_token_id=self.tok.pad_token_id or 0,
            )
        ph.t["rollout"] = time.perf_counter() - start
        p_len = self.prompts["input_ids"].shape[1]
        attn = torch.cat([self.prompts["attention_mask"], torch.ones_like(out[:, p_len:])], dim=1)
        inputs, targets = out[:, :-1], out[:, 1:]
        mask = torch.zeros_like(targets, dtype=torch.float32)
        mask[:, p_len - 1 :] = 1.0
        mask *= attn[:, 1:].float()

        def values(trunk, head, ids):
            return head(trunk(input_ids=ids, attention_mask=attn[:, :-1]).last_hidden_state).squeeze(-1)

        with torch.no_grad():
            last = self.scorer(input_ids=out, attention_mask=attn).last_hidden_state[:, -1]
            scores = self.scorer_head(last).squeeze(-1)
            old_lp = token_logprobs(self.policy(input_ids=inputs, attention_mask=attn[:, :-1]).logits, targets)
            ref_lp = token_logprobs(self.reference(input_ids=inputs, attention_mask=attn[:, :-1]).logits, targets)
            old_v = values(self.critic, self.critic_head, inputs)
            kl = old_lp - ref_lp
            rewards = -0.02 * kl * mask
            rewards[:, -1] += scores
            adv = torch.zeros_like(rewards)
            running = torch.zeros(rewards.shape[0])
            for t in reversed(range(rewards.shape[1])):
                next_v = old_v[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
                delta = rewards[:, t] + next_v - old_v[:, t]
                running = delta + 0.95 * running
                adv[:, t] = running
            returns = adv + old_v
            mean = (adv * mask).sum() / mask.sum()
            var = ((adv - mean) ** 2 * mask).sum() / mask.sum()
            adv = (adv - mean) / (var.sqrt() + 1e-8)
        order = torch.randperm(inputs.shape[0])
        for mb in order.split(self.minibatch):
            m = mask[mb]
            logits = self.policy(input_ids=inputs[mb], attention_mask=attn[mb, :-1]).logits
            ratio = torch.exp(token_logprobs(logits, targets[mb]) - old_lp[mb])
            pl = -torch.min(ratio * adv[mb], ratio.clamp(0.8, 1.2) * adv[mb])
            policy_loss = (pl * m).sum() / m.sum()
            policy_loss.backward()
            w = self.windows[mb]
            hidden = self.policy.model(input_ids=w[:, :-1]).last_hidden_state
            ptx_logits = self.policy.lm_head(hidden)
            ptx = F.cross_entropy(ptx_logits.reshape(-1, ptx_logits.shape[-1]), w[:, 1:].reshape(-1))
            ptx.backward()
            torch.nn.utils.clip_grad_norm_(self.policy_opt.param_groups[0]["params"], 1.0)
            self.policy_opt.step()
            self.policy_opt.zero_grad(set_to_none=True)
            v = values(self.critic, self.critic_head, inputs[mb])
            clipped = old_v[mb] + (v - old_v[mb]).clamp(-0.2, 0.2)
            vl = torch.max((v - returns[mb]) ** 2, (clipped - returns[mb]) ** 2)
            value_loss = 0.5 * (vl * m).sum() / m.sum()
            value_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic_opt.param_groups[0]["params"], 1.0)
            self.critic_opt.step()
            self.critic_opt.zero_grad(set_to_none=True)
        total = time.perf_counter() - start
        return ph.t["rollout"], total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--row", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ppo-minibatch", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage, shape, frozen = args.row.split(":")
    n, t = (int(x) for x in shape.split("x"))
    frozen = int(frozen)
    tok = AutoTokenizer.from_pretrained(args.model)
    if stage == "sft":
        model = load(args.model)
        freeze(model, frozen)
        opt = adam(model.parameters())
        batch = sequences(tok, t + 1, n)
        step = lambda: sft_step(model, opt, batch, max(t // 4, 1))
        tokens = n * t
    elif stage == "rm":
        model = load(args.model)
        freeze(model, frozen)
        trunk = model.model
        head = torch.nn.Linear(model.config.hidden_size, 1)
        opt = adam(list(trunk.parameters()) + list(head.parameters()))
        batch = sequences(tok, t, n)
        step = lambda: rm_step(trunk, head, opt, batch)
        tokens = n * t
    elif stage == "ppo":
        ppo = Ppo(args.model, tok, n, args.ppo_minibatch, t, frozen)

        def step():
            rollout, total = ppo.iteration()
            zero = {"forward": 0.0, "backward": 0.0, "gradients": 0.0, "optimizer": 0.0}
            return {**zero, "rollout": rollout, "total": total}

        tokens = n * (t + 30)
    else:
        raise SystemExit(f"unknown stage {stage}")
    rounds = []
    for r in range(args.warmup + args.rounds):
        cpu = cpu_secs()
        phases = step()
        if r >= args.warmup:
            rounds.append((phases, cpu_secs() - cpu))

    def secs(p):
        return p.get("total") or (p["forward"] + p["backward"] + p["gradients"] + p["optimizer"])

    rounds.sort(key=lambda pc: secs(pc[0]))
    median, cpu = rounds[len(rounds) // 2]
    step = secs(median)
    print(json.dumps({
        "engine": "pytorch",
        "stage": stage,
        "shape": shape,
        "frozen_layers": frozen,
        "step_secs": step,
        "tokens_per_sec": tokens / step,
        "gflops": float("nan"),
        "forward_secs": median["forward"],
        "backward_secs": median["backward"],
        "gradients_secs": median["gradients"],
        "optimizer_secs": median["optimizer"],
        "rollout_secs": median["rollout"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cpu_utilisation": cpu / step,
        "rounds": [secs(p) for p, _ in rounds],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
