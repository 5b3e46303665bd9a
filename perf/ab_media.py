#!/usr/bin/env python3
"""Media A/B: a saved relay binary against this build's, with `perf run`.

    python3 perf/ab_media.py BASE_RELAY [ROUNDS]      (default 3 rounds, ~7 min a round)

Each round runs `target/release/perf run --runs 1 --contenders ideal,relay/batch,relay/uring`
once with `--relay-bin BASE_RELAY` and once with `target/release/relay`, base first in odd
rounds and this build first in even ones, so that both see the same machine. The ideal
forwarder runs in every invocation, so each relay is also compared with the ideal of its own
invocation. Prints one Markdown table of medians over the rounds: fanout zero-loss egress, CPU
and user CPU per egress packet, p99 at half load; rooms CPU, user CPU and p99. Standard
library only; the per-invocation outputs stay in target/ab-media/.
"""

import os
import re
import statistics
import subprocess
import sys


def run(bin_path, out):
    cmd = [
        "target/release/perf", "run", "--runs", "1",
        "--contenders", "ideal,relay/batch,relay/uring",
        "--relay-bin", bin_path, "--out", out + ".json",
    ]
    with open(out + ".txt", "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return parse(out + ".txt")


def parse(path):
    """{(scenario, contender): {metric: value}} from perf run's Markdown tables."""
    rows, sec = {}, None
    for line in open(path):
        if line.startswith("### fanout"):
            sec = "fanout"
        elif line.startswith("### rooms"):
            sec = "rooms"
        elif sec and line.startswith("| ") and not line.startswith(("| contender", "|---")):
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if sec == "fanout":
                v = {"egress": c[5], "cpu": c[11], "user": c[9], "p99half": c[14]}
            else:
                v = {"cpu": c[9], "user": c[7], "p99": c[12]}
            rows[(sec, c[0])] = {k: float(x) for k, x in v.items()}
    return rows


def main():
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        sys.exit(__doc__)
    base = os.path.abspath(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    this = os.path.abspath("target/release/relay")
    os.makedirs("target/ab-media", exist_ok=True)
    results = {"base": [], "this": []}
    for r in range(1, rounds + 1):
        order = ["base", "this"] if r % 2 == 1 else ["this", "base"]
        for who in order:
            out = f"target/ab-media/{who}-{r}"
            results[who].append(run(base if who == "base" else this, out))
            print(f"round {r}: {who} done", file=sys.stderr)

    def med(who, sec, name, k):
        return statistics.median(x[(sec, name)][k] for x in results[who])

    print(f"media A/B, {rounds} rounds, medians: base {base} against this build's {this}")
    print()
    print("| scenario | contender | metric | base | this | this / base "
          "| base / ideal | this / ideal |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    metrics = {"fanout": ["egress", "cpu", "user", "p99half"], "rooms": ["cpu", "user", "p99"]}
    for sec, keys in metrics.items():
        for name in ["relay/batch", "relay/uring"]:
            for k in keys:
                b, t = med("base", sec, name, k), med("this", sec, name, k)
                ib, it = med("base", sec, "ideal", k), med("this", sec, "ideal", k)
                print(f"| {sec} | {name} | {k} | {b:g} | {t:g} | {t / b:.3f} "
                      f"| {b / ib:.2f} | {t / it:.2f} |")


if __name__ == "__main__":
    main()
