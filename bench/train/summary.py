"""Median per row and engine of bench/train/compare.sh's JSON lines, with instructd's speed relative to PyTorch."""

import json
import statistics
import sys
from collections import defaultdict


def main(path):
    rows = defaultdict(lambda: defaultdict(list))
    for line in open(path):
        r = json.loads(line)
        rows[(r["stage"], r["shape"], r["frozen_layers"])][r["engine"]].append(r)
    print("| stage | shape | frozen | instructd s | PyTorch s | speed vs PyTorch | per-round ratios "
          "| instructd fwd/bwd/adam s | PyTorch fwd/bwd/adam s | peak RSS MB (instructd / PyTorch) |")
    print("|---|---|---:|---:|---:|---:|---|---|---|---|")
    for (stage, shape, frozen), engines in rows.items():
        ours, theirs = engines.get("instructd", []), engines.get("pytorch", [])
        if not ours or not theirs:
            continue
        a = statistics.median(r["step_secs"] for r in ours)
        b = statistics.median(r["step_secs"] for r in theirs)
        by_round = {r["round"]: r["step_secs"] for r in theirs}
        ratios = [by_round[r["round"]] / r["step_secs"] for r in ours if r["round"] in by_round]

        def phases(rs):
            m = lambda k: statistics.median(r[k] for r in rs)
            if stage == "ppo":
                return f"rollout {m('rollout_secs'):.2f}"
            return f"{m('forward_secs'):.2f} / {m('backward_secs'):.2f} / {m('optimizer_secs'):.2f}"

        rss = lambda rs: max(r["peak_rss_mb"] for r in rs)
        print(f"| {stage} | {shape} | {frozen} | {a:.2f} | {b:.2f} | {b / a:.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | {phases(ours)} | {phases(theirs)} | "
              f"{rss(ours):.0f} / {rss(theirs):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
