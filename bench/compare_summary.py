#!/usr/bin/env python3
"""Side-by-side summary of bench/compare.sh's alternating rounds.

Reads one JSON object per line (`instructd bench --json` and
`bench/llamacpp/bench.py --json`, each tagged with its round) and prints, per
workload, both engines' median tok/s and p99 latency over the rounds, and the
instructd / llama.cpp throughput ratio of every round with its median. Rows
are matched by workload name; batch-1 decode is compared against the better
of llama.cpp's two batch-1 figures (its Python API and its server), and
"decode excluding prefill" compares instructd's 1000 / TPOT with llama.cpp's
API figure over the same tokens.

    python3 bench/compare_summary.py results.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict


def rows_by_workload(result):
    rows = {r["workload"]: r for r in result["rows"]}
    if result["engine"] == "instructd":
        for name, r in list(rows.items()):
            if name.startswith("decode 1 concurrent") and r.get("tpot_p50_ms"):
                rows["decode excluding prefill, 1 request"] = {
                    "workload": "decode excluding prefill, 1 request",
                    "tokens_per_s": 1000.0 / r["tpot_p50_ms"],
                    "latency_p99_ms": None,
                }
    else:
        api = next((r for n, r in rows.items() if "(Python API)" in n), None)
        for name, r in list(rows.items()):
            if name.startswith("decode 1 concurrent") and api and api["tokens_per_s"] > r["tokens_per_s"]:
                rows[name] = {**api, "workload": name}
        if result.get("api_decode_only_tok_s"):
            rows["decode excluding prefill, 1 request"] = {
                "workload": "decode excluding prefill, 1 request",
                "tokens_per_s": result["api_decode_only_tok_s"],
                "latency_p99_ms": None,
            }
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(path):
    results = [json.loads(line) for line in open(path) if line.strip()]
    # by_round[round][engine] = {workload: row}
    by_round = defaultdict(dict)
    for result in results:
        by_round[result["round"]][result["engine"]] = rows_by_workload(result)
    rounds = sorted(r for r in by_round if {"instructd", "llama.cpp"} <= by_round[r].keys())
    if not rounds:
        print("no round has results from both engines", file=sys.stderr)
        return 1
    workloads = [w for w in by_round[rounds[0]]["instructd"] if w in by_round[rounds[0]]["llama.cpp"]]

    def median(engine, workload, key):
        values = [by_round[r][engine][workload].get(key) for r in rounds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    print(f"## instructd vs llama.cpp, {len(rounds)} alternating rounds (medians)")
    print()
    print("| workload | instructd tok/s | llama.cpp tok/s | ratio per round | median ratio "
          "| instructd p99 ms | llama.cpp p99 ms |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for w in workloads:
        ratios = [
            by_round[r]["instructd"][w]["tokens_per_s"] / by_round[r]["llama.cpp"][w]["tokens_per_s"] for r in rounds
        ]
        print(
            f"| {w} | {median('instructd', w, 'tokens_per_s'):.1f} | {median('llama.cpp', w, 'tokens_per_s'):.1f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} "
            f"| {fmt(median('instructd', w, 'latency_p99_ms'), '.0f')} "
            f"| {fmt(median('llama.cpp', w, 'latency_p99_ms'), '.0f')} |"
        )
    print()
    print("ratio: instructd tok/s over llama.cpp tok/s in the same round (> 1: instructd faster).")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
