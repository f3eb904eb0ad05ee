#!/usr/bin/env python3
"""llama.cpp side of the side-by-side benchmark (see README.md beside this file).

Measures, on one GGUF file, what `instructd bench` measures on our engine and
prints it in the same table layout:

  * prefill: one prompt of P tokens, time to first token (median of 3 after a
    warm-up), through the `llama_cpp.Llama` Python API;
  * decode at batch 1 through the same API (G tokens, greedy, EOS ignored);
  * decode at each concurrency c: an OpenAI-compatible server on 127.0.0.1,
    c concurrent streaming /v1/completions requests with distinct P-token
    prompts and max_tokens G; aggregate completion tok/s, TTFT and request
    latency percentiles, and the server's peak RSS. The server is llama.cpp's
    own `llama-server` with `--parallel` slots batching continuously when
    `--llama-server BIN` is given (scripts/build-llama-server.sh builds it from
    the same vendored sources), else llama-cpp-python's server, which runs one
    request at a time.

Prompts are built as `instructd bench` builds them: "Request {i}. " followed by
a repeated English passage, tokenized without special tokens and truncated to
exactly P tokens.

Run with the venv that setup.sh builds:
  .cache/bench-venv/bin/python bench/llamacpp/bench.py --gguf /tmp/smollm2-f32.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

# The same passage as src/cmd/bench.rs, so both engines see the same prompts.
PASSAGE = (
    "The history of the printing press begins with the need to copy texts faster than "
    "scribes could. Movable type, ink that clung to metal, and a press adapted from those used for wine and "
    "olive oil came together in the fifteenth century. Within fifty years presses operated in hundreds of "
    "towns, books became cheaper, and ideas travelled further and faster than ever before. "
)

# llama.cpp's llama_ftype values (general.file_type), as `instructd bench --dtype` spells them.
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16"}

HOST = "127.0.0.1"


@dataclass
class Row:
    workload: str
    requests: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass
class Timing:
    ttft: float
    total: float
    tokens: int
    finish_reason: str | None


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile, as src/cmd/bench.rs computes it."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_busy_s() -> tuple[float, float]:
    """System-wide (busy, total) CPU seconds from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / hz, sum(fields) / hz


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherCpu:
    """Share of the machine's CPU time that other processes used between
    start() and pct(): busy time from /proc/stat minus this process's and the
    server's (`extra_cpu`). llama.cpp's threads spin at barriers, so even a
    little competition for the cores distorts a row; this says which rows."""

    def __init__(self, extra_cpu=lambda: 0.0):
        self.extra_cpu = extra_cpu
        self.start()

    def _own(self) -> float:
        return sum(os.times()[:2]) + self.extra_cpu()

    def start(self) -> None:
        self.busy, self.total = cpu_busy_s()
        self.own = self._own()

    def pct(self) -> float:
        busy, total = cpu_busy_s()
        other = (busy - self.busy) - (self._own() - self.own)
        return 100.0 * max(0.0, other) / max(1e-9, total - self.total)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_prompts(llm, length: int, indices: list[int]) -> dict[int, list[int]]:
    """Distinct prompts of exactly `length` tokens, keyed by request index (as ids,
    for the Python API; see `server_prompts` for the server)."""
    passage = llm.tokenize((PASSAGE * (length // 40 + 2)).encode(), add_bos=False, special=False)
    prompts = {}
    for i in indices:
        ids = llm.tokenize(f"Request {i}. ".encode(), add_bos=False, special=False) + passage
        ids = ids[:length]
        if len(ids) != length:
            raise SystemExit(f"could not build a {length}-token prompt")
        prompts[i] = ids
    return prompts


def server_prompts(llm, length: int, indices: list[int]) -> dict[int, str]:
    """Distinct prompt texts that the server tokenizes to exactly `length` tokens.

    The server's /v1/completions takes text only and tokenizes it with
    special=True (plus BOS only when the model asks for one). The id prompts
    above join two separately tokenized pieces (" " + "The" where one pass
    gives " The"), so they do not survive a round trip through text; these use
    the one-pass tokenization of the same text, truncated to `length` tokens,
    and the round trip is checked rather than assumed."""
    bos = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() >= 0 else []
    passage = PASSAGE * (length // 40 + 2)
    texts = {}
    for i in indices:
        ids = llm.tokenize(f"Request {i}. {passage}".encode(), add_bos=False, special=True)[: length - len(bos)]
        text = llm.detokenize(ids).decode("utf-8")
        again = bos + llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if len(again) != length or again != bos + ids:
            raise SystemExit(f"prompt {i} does not round-trip through the server's tokenization ({len(again)} tokens)")
        texts[i] = text
    return texts


def eog_tokens(llm) -> list[int]:
    """Every end-of-generation token (EOS, EOT, <|im_end|>, ...) of the model's vocab."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


# --------------------------------------------------------------------------- API


def generate_timed(llm, prompt: list[int], n: int) -> tuple[float, float, float]:
    """Greedy generation of exactly n tokens (EOS ignored: generate() does not stop
    on it). Returns (ttft, time of the last token, total), seconds from start."""
    llm.reset()  # no KV-cache prefix reuse from the previous call
    start = time.perf_counter()
    ttft = last = 0.0
    count = 0
    for _token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        now = time.perf_counter() - start
        if count == 0:
            ttft = now
        last = now
        count += 1
        if count >= n:
            break
    return ttft, last, time.perf_counter() - start


def bench_api(args, llm, prompts: dict[int, list[int]]) -> tuple[list[Row], dict]:
    # Warm-up: first touch of the weights, thread pool start.
    generate_timed(llm, prompts[-1], 4)
    other = OtherCpu()
    prefill = sorted(generate_timed(llm, prompts[-2 - k], 1)[0] for k in range(3))
    ttft = prefill[1]
    rows = [
        Row(
            workload=f"prefill {args.prompt_tokens} tokens",
            requests=1,
            tokens_per_s=args.prompt_tokens / ttft,
            ttft_p50_ms=ttft * 1e3,
            ttft_p99_ms=prefill[2] * 1e3,
            latency_p50_ms=ttft * 1e3,
            latency_p99_ms=prefill[2] * 1e3,
        )
    ]
    other_pct = [other.pct()]
    g = args.gen_tokens
    other.start()
    first, last, total = generate_timed(llm, prompts[-5], g)
    other_pct.append(other.pct())
    rows.append(
        Row(
            workload=f"decode 1 x {g} tokens (Python API)",
            requests=1,
            tokens_per_s=g / total,
            ttft_p50_ms=first * 1e3,
            ttft_p99_ms=first * 1e3,
            latency_p50_ms=total * 1e3,
            latency_p99_ms=total * 1e3,
        )
    )
    extra = {
        "api_decode_only_tok_s": (g - 1) / (last - first) if g > 1 and last > first else None,
        "other_cpu_pct": other_pct,
    }
    return rows, extra


# ------------------------------------------------------------------------ server


class Server:
    """The OpenAI server as a child process, killed on exit: llama.cpp's
    `llama-server` (`--llama-server`), or llama-cpp-python's."""

    def __init__(self, args, log_path: str):
        self.port = args.port or free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.ready_path = "/health" if args.llama_server else "/v1/models"
        if args.llama_server:
            # The context is split across the slots: each gets n_ctx.
            cmd = [
                args.llama_server,
                "-m", args.gguf,
                "--host", HOST,
                "--port", str(self.port),
                "-c", str(args.n_ctx * args.parallel),
                "-np", str(args.parallel),
                "-t", str(args.threads),
                "-tb", str(args.threads),
            ]  # fmt: skip
            self.log = open(log_path, "wb")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            return
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", args.gguf,
            "--host", HOST,
            "--port", str(self.port),
            "--n_ctx", str(args.n_ctx),
            "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads),
            # Default True: a waiting request cuts the running stream short after
            # its next chunk, which would make every stream but one end early.
            "--interrupt_requests", "False",
            "--verbose", "False",
        ]  # fmt: skip
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready")
            try:
                # llama-server lists its model while still loading; its /health turns 200 once it serves.
                with urllib.request.urlopen(f"{self.base}{self.ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f}s")

    def cpu_s(self) -> float:
        try:
            return process_cpu_s(self.proc.pid)
        except (OSError, IndexError, ValueError):
            return 0.0

    def peak_rss_mb(self) -> float | None:
        return vm_hwm_mb(self.proc.pid) if self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.log.close()


def stream_completion(base: str, body: dict, timeout: float) -> Timing:
    """One streaming /v1/completions request; TTFT is the first chunk with text."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        f"{base}/v1/completions", data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    start = time.perf_counter()
    deadline = start + timeout
    ttft = None
    chunks = 0
    finish = None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"request exceeded {timeout:.0f}s")
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            choice = chunk["choices"][0]
            if choice.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    total = time.perf_counter() - start
    # Streams carry no usage; a stream that ended on "length" produced exactly
    # max_tokens tokens (EOS is biased away), otherwise count text chunks.
    tokens = body["max_tokens"] if finish == "length" else chunks
    return Timing(ttft=ttft if ttft is not None else total, total=total, tokens=tokens, finish_reason=finish)


def run_concurrent(base: str, prompts: list[str], args, bias: dict[str, float]) -> tuple[list[Timing], float]:
    results: list[Timing | BaseException | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        body = {
            "prompt": prompts[i],  # text that tokenizes back to exactly P tokens
            "max_tokens": args.gen_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": True,
            "logit_bias": bias,
        }
        try:
            barrier.wait(timeout=30)
            results[i] = stream_completion(base, body, args.request_timeout)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.request_timeout + 60)
    wall = time.perf_counter() - start
    errors = [r for r in results if not isinstance(r, Timing)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} requests failed: {errors[0]!r}")
    return results, wall  # type: ignore[return-value]


def bench_server(args, prompts: dict[int, str], bias: dict[str, float], log_path: str) -> tuple[list[Row], dict]:
    server = Server(args, log_path)
    rows: list[Row] = []
    extra: dict = {"server_port": server.port, "short_streams": 0, "other_cpu_pct": []}
    try:
        server.wait_ready(args.server_timeout)
        run_concurrent(server.base, [prompts[-10]], argparse.Namespace(**{**vars(args), "gen_tokens": 4}), bias)
        next_index = 0
        for c in args.concurrency:
            # Globally distinct prompts: llama-cpp-python reuses the KV cache of the
            # previous prompt's longest common prefix, which must stay ~1 token.
            batch = [prompts[next_index + i] for i in range(c)]
            next_index += c
            other = OtherCpu(server.cpu_s)
            timings, wall = run_concurrent(server.base, batch, args, bias)
            extra.setdefault("other_cpu_pct", []).append(other.pct())
            short = [t for t in timings if t.finish_reason != "length"]
            extra["short_streams"] += len(short)
            generated = sum(t.tokens for t in timings)
            ttft = sorted(t.ttft for t in timings)
            latency = sorted(t.total for t in timings)
            rows.append(
                Row(
                    workload=f"decode {c} concurrent x {args.gen_tokens} tokens",
                    requests=c,
                    tokens_per_s=generated / wall,
                    ttft_p50_ms=percentile(ttft, 50) * 1e3,
                    ttft_p99_ms=percentile(ttft, 99) * 1e3,
                    latency_p50_ms=percentile(latency, 50) * 1e3,
                    latency_p99_ms=percentile(latency, 99) * 1e3,
                )
            )
            print(f"  c={c}: {generated} tokens in {wall:.1f}s", file=sys.stderr, flush=True)
        extra["server_peak_rss_mb"] = server.peak_rss_mb()
        extra["server_cpu_s"] = server.cpu_s()
    except BaseException:
        server.stop()
        try:
            with open(log_path, "rb") as f:
                tail = f.read()[-4000:].decode("utf-8", "replace")
            print(f"--- server log tail ({log_path}) ---\n{tail}", file=sys.stderr)
        except OSError:
            pass
        raise
    server.stop()
    return rows, extra


# -------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="GGUF model file (e.g. the F32 file from dequantize-gguf)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts for the server runs")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp compute threads (n_threads and n_threads_batch)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (default: a free one)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--server-timeout", type=float, default=120.0, help="seconds for the server to load")
    p.add_argument("--skip-server", action="store_true", help="only the Python API measurements")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary for the concurrent rows")
    p.add_argument("--parallel", type=int, default=16, help="llama-server slots (-np), with --llama-server")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not os.path.isfile(args.gguf):
        p.error(f"no such file: {args.gguf}")
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or any(c < 1 for c in args.concurrency):
        p.error("--prompt-tokens, --gen-tokens and --concurrency must be positive")
    if args.prompt_tokens + args.gen_tokens > args.n_ctx:
        p.error("--prompt-tokens + --gen-tokens must fit in --n-ctx")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    load_avg_start = os.getloadavg()[0]
    busy_start, total_start = cpu_busy_s()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server is killed.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    import llama_cpp

    load_start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - load_start
    ftype = llm.metadata.get("general.file_type")
    dtype = FILE_TYPES.get(int(ftype), f"ftype {ftype}") if ftype is not None else "unknown"
    # Request indices: 0.. for the server runs, negative ones for the API runs and warm-ups.
    indices = list(range(-10, 0)) + list(range(sum(args.concurrency)))
    prompts = make_prompts(llm, args.prompt_tokens, indices)
    texts = server_prompts(llm, args.prompt_tokens, indices)
    bias = {str(t): -100.0 for t in eog_tokens(llm)}

    rows, extra = bench_api(args, llm, prompts)
    extra["api_peak_rss_mb"] = vm_hwm_mb()
    llm.close()
    del llm

    if not args.skip_server:
        with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmp:
            server_rows, server_extra = bench_server(args, texts, bias, os.path.join(tmp, "server.log"))
        rows += server_rows
        server_extra["other_cpu_pct"] = extra["other_cpu_pct"] + server_extra["other_cpu_pct"]
        extra.update(server_extra)

    cpu = cpu_name()
    cores = os.cpu_count() or 1
    peak = extra.get("server_peak_rss_mb") or extra.get("api_peak_rss_mb")
    server = f"llama-server -np {args.parallel}" if args.llama_server else "llama-cpp-python's server"
    extra["server"] = server
    print(
        f"engine llama.cpp (llama-cpp-python {llama_cpp.__version__}; concurrent rows: {server}), model {args.gguf} "
        f"({dtype}), {cpu}, {cores} cores, {args.threads} compute threads, load {load_s:.2f}s"
    )
    print()
    print("| workload | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.workload} | {r.tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | "
            f"{r.latency_p50_ms:.0f} | {r.latency_p99_ms:.0f} |"
        )
    print()
    if extra.get("api_decode_only_tok_s"):
        print(f"batch-1 decode excluding prefill (Python API): {extra['api_decode_only_tok_s']:.1f} tok/s")
    if extra.get("api_peak_rss_mb"):
        print(f"peak RSS {extra['api_peak_rss_mb']:.0f} MB (bench process, Python API runs)")
    if extra.get("server_peak_rss_mb"):
        print(f"peak RSS {extra['server_peak_rss_mb']:.0f} MB (server process)")
    load_avg_end = os.getloadavg()[0]
    extra["load_avg_1m"] = [load_avg_start, load_avg_end]
    # How much CPU other processes took while this ran: llama.cpp's threads spin
    # at barriers, so even a little competition for the cores skews its numbers.
    busy_end, total_end = cpu_busy_s()
    own = sum(os.times()[:2]) + extra.get("server_cpu_s", 0.0)
    other_pct = 100.0 * max(0.0, (busy_end - busy_start) - own) / max(1e-9, total_end - total_start)
    extra["other_processes_cpu_pct"] = other_pct
    print(
        f"other processes used {other_pct:.0f}% of the machine's CPU time during the run, per row: "
        + ", ".join(f"{p:.0f}%" for p in extra["other_cpu_pct"])
        + f" (1-min load average {load_avg_start:.2f} at start, {load_avg_end:.2f} at end, {cores} cores)"
    )
    if max(extra["other_cpu_pct"]) > 5:
        print("WARNING: other processes competed for the CPU; rows above 5% are not comparable")
    if extra.get("short_streams"):
        print(f"WARNING: {extra['short_streams']} streams ended before max_tokens")
    if args.json:
        out = {
            "engine": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "model": args.gguf,
            "dtype": dtype,
            "cpu": cpu,
            "cores": cores,
            "threads": args.threads,
            "load_s": load_s,
            "peak_rss_mb": peak,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "rows": [{**asdict(r), "other_cpu_pct": p} for r, p in zip(rows, extra["other_cpu_pct"])],
            **extra,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
