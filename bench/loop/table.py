"""The loop benchmark's table (called by bench/loop/run.sh): one row per refresh, then
the win rates under the hidden rule with their 95% intervals, then PPO's iterations."""
import json
import sys

(checkpoints, sft_win, ppo_win, ppo_vs_sft, sft, ppo, r1, r2, loop_secs, preference,
 round1_secs, round2_secs) = sys.argv[1:13]
rows = {r["id"]: r for r in json.load(open(checkpoints))["data"]}
r1, r2 = json.loads(r1), json.loads(r2)


def f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def interval(w):
    if not w or w.get("win_rate") is None:
        return "-"
    return f"{w['win_rate']:.2f} [{w['win_rate_lower']:.2f}, {w['win_rate_upper']:.2f}] on {w['prompts']}"


print(f"hidden preference: {preference}; loop wall time {int(loop_secs)} s; round 1: {r1.get('logged')} prompts "
      f"({r1.get('demonstrations')} demonstrations) in {round1_secs} s; round 2: {r2.get('logged')} prompts, "
      f"{r2.get('rankings')} rankings of K = {r2.get('k')} in {round2_secs} s\n")
print("| refresh | stage wall time | RM win rate vs serving [95%] | KL from SFT (nats) | alignment tax (nats/token) | gate |")
print("|---|---:|---:|---:|---:|---|")
for r in sorted(rows.values(), key=lambda r: r["created_at_ms"]):
    m, ev = r["metrics"], r["metrics"].get("evaluation") or {}
    extra = ""
    if r["stage"] == "reward_model":
        per_epoch = ", ".join(f(a, "{:.2f}") for a in m.get("val_accuracy_per_epoch") or [])
        extra = (f" (val. pair accuracy {f(m.get('val_accuracy_before'), '{:.2f}')} -> {f(m.get('val_accuracy'), '{:.2f}')}"
                 f" on {m.get('val_pairs')} pairs, epoch {m.get('kept_epoch')} kept; per epoch: {per_epoch};"
                 f" {m.get('train_prompts')} training rankings)")
    rm_win = "-"
    if ev:
        rm_win = f"{ev['win_rate']:.2f}"
        if "win_rate_lower" in ev:
            rm_win += f" [{ev['win_rate_lower']:.2f}, {ev['win_rate_upper']:.2f}] on {ev['prompts']}"
    gate = "-" if not ev else ("passed" if ev.get("passed") else "held back: " + "; ".join(ev.get("reasons", [])))
    tax = ev.get("alignment_tax")
    tax_pct = ""
    if tax is not None and ev.get("ptx_loss_serving"):
        tax_pct = f" ({100 * tax / ev['ptx_loss_serving']:+.1f}%)"
    print(f"| {r['stage']}{extra} | {f(m.get('wall_secs'), '{:.0f} s')} | {rm_win} | {f(ev.get('kl_from_sft'), '{:.2f}')} | "
          f"{f(tax, '{:+.3f}')}{tax_pct} | {gate} |")

print("\nWin rates under the hidden rule on held-out prompts (wins + ties/2, Wilson 95% interval):\n")
print("| candidate | baseline | win rate [95%] on prompts |")
print("|---|---|---:|")
for label, base, w in (("SFT", "start-up model", sft_win), ("PPO-ptx", "start-up model", ppo_win),
                       ("PPO-ptx", "SFT", ppo_vs_sft)):
    print(f"| {label} | {base} | {interval(json.loads(w))} |")

run = rows.get(ppo)
if run:
    print("\nPPO iterations:\n\n| iteration | reward | KL | beta | entropy | clip fraction | value loss | ptx loss | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for it in run["metrics"].get("iterations", []):
        print(f"| {it['iteration']} | {it['reward_mean']:+.3f} | {it['kl']:.3f} | {f(it.get('kl_coef'), '{:.3f}')} | "
              f"{it['entropy']:.3f} | {it['clip_fraction']:.3f} | {it['value_loss']:.4f} | {f(it.get('ptx_loss'))} | "
              f"{it['wall_secs']:.0f} |")
