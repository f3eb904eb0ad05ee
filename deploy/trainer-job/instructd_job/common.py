"""The part every stage shares: the environment the external backend passes, the snapshot's JSONL files, the
chat encoding, the optimiser and learning-rate schedule, gradient norms, and writing a model directory in the
project's layout.

Everything here mirrors a piece of the in-process trainer (trainer/src); the Rust item is named next to each
function so a change on one side is easy to follow on the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# policy_model.rs: SIDECAR_FILES, copied verbatim next to the weights.
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
)
WEIGHTS_FILE = "model.safetensors"


class JobError(Exception):
    """A problem with the job's inputs: reported on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Environment (backend.rs: External::command)


@dataclasses.dataclass
class JobEnv:
    stage: str
    snapshot_dir: Path
    policy_dir: Path
    output_dir: Path
    hyperparameters: dict[str, Any]
    corpus_dir: Path | None
    reference_dir: Path | None
    reward_model_dir: Path | None
    corpus: dict[str, Any]
    evaluation: dict[str, Any]

    @staticmethod
    def from_environ(environ: dict[str, str] | None = None) -> "JobEnv":
        env = dict(os.environ if environ is None else environ)

        def need(name: str) -> str:
            value = env.get(name)
            if not value:
                raise JobError(f"{name} is not set (the external backend sets it)")
            return value

        def optional_path(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        def json_var(name: str, required: bool) -> dict[str, Any]:
            text = env.get(name)
            if not text:
                if required:
                    raise JobError(f"{name} is not set (the external backend sets it)")
                return {}
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise JobError(f"{name} is not JSON: {e}") from e
            if not isinstance(value, dict):
                raise JobError(f"{name} must be a JSON object")
            return value

        stage = need("INSTRUCTD_STAGE")
        if stage not in ("sft", "reward_model", "ppo_ptx"):
            raise JobError(f"INSTRUCTD_STAGE={stage!r}: expected sft, reward_model or ppo_ptx")
        return JobEnv(
            stage=stage,
            snapshot_dir=Path(need("INSTRUCTD_SNAPSHOT_DIR")),
            policy_dir=Path(need("INSTRUCTD_POLICY_DIR")),
            output_dir=Path(need("INSTRUCTD_OUTPUT_DIR")),
            hyperparameters=json_var("INSTRUCTD_HYPERPARAMETERS", True),
            corpus_dir=optional_path("INSTRUCTD_CORPUS_DIR"),
            reference_dir=optional_path("INSTRUCTD_REFERENCE_DIR"),
            reward_model_dir=optional_path("INSTRUCTD_REWARD_MODEL_DIR"),
            corpus=json_var("INSTRUCTD_CORPUS", False),
            evaluation=json_var("INSTRUCTD_EVALUATION", False),
        )


# ---------------------------------------------------------------------------------------------------------------
# Snapshot (snapshot.rs: SftExample, RankedExample, PromptExample)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise JobError(f"{path}:{n}: invalid JSON: {e}") from e
    return rows


@dataclasses.dataclass
class Snapshot:
    sft: list[dict[str, Any]]
    rm: list[dict[str, Any]]
    prompts: list[dict[str, Any]]

    @staticmethod
    def load(directory: Path) -> "Snapshot":
        if not directory.is_dir():
            raise JobError(f"snapshot {directory} is not a directory")
        return Snapshot(
            sft=read_jsonl(directory / "sft.jsonl"),
            rm=read_jsonl(directory / "rm.jsonl"),
            prompts=read_jsonl(directory / "prompts.jsonl"),
        )


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation (policy_model.rs: encode_chat, encode_prompt)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_id(tokenizer, model_dir: Path) -> int:
    """The first end-of-sequence id: tokenizer_config's `eos_token`, else generation_config's (tokenizer.rs)."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        value = json.loads(generation.read_text()).get("eos_token_id")
        if isinstance(value, list) and value:
            return int(value[0])
        if isinstance(value, int):
            return value
    raise JobError("the tokenizer has no end-of-sequence token")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt as one user message through the chat template, with the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_chat(tokenizer, eos: int, prompt: str, response: str, append_eos: bool = True) -> tuple[list[int], int]:
    """(ids, prompt_len): the rendered prompt, the response tokens, then EOS."""
    ids = encode_prompt(tokenizer, prompt)
    prompt_len = len(ids)
    ids += list(tokenizer.encode(response, add_special_tokens=False))
    if append_eos:
        ids.append(eos)
    return ids, prompt_len


# ---------------------------------------------------------------------------------------------------------------
# Models


def load_policy(model_dir: Path):
    """A Hugging Face causal LM in F32 (the in-process trainer trains in F32 too)."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise JobError(f"{model_dir}: no config.json")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    return model


def max_positions(model) -> int:
    return int(model.config.max_position_embeddings)


def freeze_layers(model, n: int) -> None:
    """Freezes the token embedding and the lowest `n` layers (policy_model.rs: with_frozen_layers); with tied
    embeddings the output projection freezes with the embedding."""
    if n <= 0:
        return
    base = model.model if hasattr(model, "model") else model
    n = min(n, len(base.layers))
    base.embed_tokens.weight.requires_grad_(False)
    for layer in base.layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)


def stage_config(defaults: dict[str, Any], hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings: its defaults, overridden by the trainer's (the stage config as the trainer serialised
    it). An option this job does not implement is refused by name, never trained another way."""
    config = {**defaults, **hyperparameters}
    if int(config.get("lora_rank") or 0) > 0:
        raise JobError("lora_rank > 0: LoRA adapters are an in-process trainer option; this job trains every "
                       "unfrozen weight (set lora_rank = 0 for the external backend)")
    return config


def checkpoint_activations(model, config: dict[str, Any]) -> None:
    """`gradient_checkpointing` (the in-process trainer's option of the same name): each decoder layer keeps only
    its input and recomputes its activations in the backward pass. Same gradients, less memory, one more forward."""
    if config.get("gradient_checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def add_residual_dropout(model, p: float) -> None:
    """Dropout on every residual branch (attention and MLP outputs) while the model is in training mode, as the
    in-process trainer's `residual_dropout`. The random draws differ from candle's; p = 0 (the default) adds
    nothing."""
    if p <= 0:
        return
    base = model.model if hasattr(model, "model") else model

    def hook(module, _inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, p, True)

    for layer in base.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def state_tensors(model, accelerator=None) -> dict[str, torch.Tensor]:
    """The weights under their Hugging Face names, without the tied `lm_head.weight` (the project's files hold
    the embedding once). Under several processes (FSDP, ZeRO) the full weights are gathered through Accelerate
    (every process must call this)."""
    state, model = full_state(model, accelerator)
    return hf_tensors(state, model.config)


def full_state(model, accelerator=None) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Every weight of `model` whole, and the unwrapped model. Under several processes the weights are gathered
    through Accelerate (FSDP shards them; every process must call this, and under FSDP only the main process is
    guaranteed the full tensors)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return accelerator.get_state_dict(model), accelerator.unwrap_model(model)
    return model.state_dict(), model


def hf_tensors(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A causal LM's state dict as the project's files hold it: F32, contiguous, on the CPU, without the tied
    `lm_head.weight` and the rotary tables."""
    tensors = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        if "rotary_emb" in name:
            continue
        tensors[name] = tensor.detach().to(torch.float32).contiguous().cpu()
    return tensors


def save_model_dir(tensors: dict[str, torch.Tensor], source_dir: Path, out_dir: Path) -> None:
    """A loadable model directory (policy_model.rs: PolicyModel::save): `model.safetensors` in F32, the source's
    config.json with `torch_dtype` = float32, and the sidecar files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_FILE)
    if source_dir.resolve() == out_dir.resolve():
        return
    config = json.loads((source_dir / "config.json").read_text())
    config["torch_dtype"] = "float32"
    write_json(out_dir / "config.json", config)
    for name in SIDECAR_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Optimisation (optim.rs)

PAPER_FINAL_LR_RATIO = 0.1


@dataclasses.dataclass
class LrSchedule:
    """optim.rs: LrSchedule. Linear warm-up from `warmup_start_ratio` of the peak, then cosine decay to
    `final_ratio` of the peak at the last step, or constant."""

    peak: float
    warmup_steps: int
    total_steps: int
    final_ratio: float | None  # None: constant after warm-up
    warmup_start_ratio: float = 0.1

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            ramp = step / self.warmup_steps
            return self.peak * (self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * ramp)
        if self.final_ratio is None:
            return self.peak
        decay_steps = max(self.total_steps - self.warmup_steps, 0)
        progress = 0.0 if decay_steps <= 1 else min((step - self.warmup_steps) / (decay_steps - 1), 1.0)
        floor = self.peak * self.final_ratio
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adam(params, config: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam with the paper's betas (0.9, 0.95) and decoupled weight decay (optim.rs: Adam, AdamConfig)."""
    a = config or {}
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=0.0,
        betas=(float(a.get("beta1", 0.9)), float(a.get("beta2", 0.95))),
        eps=float(a.get("eps", 1e-8)),
        weight_decay=float(a.get("weight_decay", 0.0)),
    )


@dataclasses.dataclass
class StageTraining:
    """What SFT and the reward model set up alike before their loops: the schedule over every step of every
    epoch, Adam over the trainable parameters, both prepared by Accelerate (`model` is the prepared one)."""

    model: Any
    optimizer: torch.optim.Optimizer
    params: list
    schedule: LrSchedule
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def prepare(cls, accelerator, model, config: dict[str, Any], items: int, batch: int) -> "StageTraining":
        steps_per_epoch = -(-items // batch)
        total_steps = steps_per_epoch * config["epochs"]
        schedule = LrSchedule(config["learning_rate"], config["warmup_steps"], total_steps, config["final_lr_ratio"])
        optimizer = adam([p for p in model.parameters() if p.requires_grad], config["adam"])
        model, optimizer = accelerator.prepare(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(model, optimizer, params, schedule, steps_per_epoch, total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(params, max_norm: float | None, accelerator=None) -> float:
    """The global gradient norm before clipping; scales the gradients down to `max_norm` when above it
    (optim.rs: Gradients::clip_global_norm). Multi-process runs let Accelerate compute the norm over shards."""
    params = [p for p in params if p.grad is not None]
    if accelerator is not None and accelerator.num_processes > 1:
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)
    total = 0.0
    for p in params:
        g = p.grad.detach().to(torch.float64)
        total += float((g * g).sum())
    norm = math.sqrt(total)
    if max_norm is not None and math.isfinite(norm) and norm > max_norm and norm > 0:
        scale = max_norm / norm
        for p in params:
            p.grad.mul_(scale)
    return norm


def shares(micro_batches: int, world: int, rank: int) -> list[int]:
    """The micro-batches of one optimiser step this process runs: every `world`-th, padded with repeats of -1 so
    each process runs the same number of backward passes (collectives stay aligned); -1 means "run a
    micro-batch with weight 0"."""
    mine = list(range(rank, micro_batches, world))
    per_rank = -(-micro_batches // world)
    return mine + [-1] * (per_rank - len(mine))
