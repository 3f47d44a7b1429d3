"""Quick held-out gold evaluation of the policies in a run dir (used while choosing the RL defaults)."""
import sys
from pathlib import Path

import datasets
import numpy as np

from rlhb_cli.behaviors.binning import BinSpec
from rlhb_cli.behaviors.text import BehaviorTemplate
from rlhb_cli.models.load import load_causal_lm
from rlhb_cli.policies import generate_responses, policy_meta
from rlhb_cli.prompts import generator_prompt
from rlhb_cli.rundir import read_json
from rlhb_cli.simulator.gold import GoldJudge

run = Path(sys.argv[1])
stages = sys.argv[2:]
import json
env = json.loads((run / "simulate-logs" / "environment.json").read_text())
import os
if os.environ.get("SPLIT", "test") == "eval":
    queries = sorted(q["text"] for q in env["queries"] if q["split"] == "eval")
else:
    queries = sorted(set(datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["test"]["query"]))
spec = BinSpec.from_json(read_json(run / "prepare-behaviors" / "bins.json"))
best = BehaviorTemplate.load("en").most_preferred(spec)
gold = GoldJudge.load(run / "simulate-logs" / "environment.json")
for stage in stages:
    policy = run / stage / "policy"
    meta = policy_meta(policy)
    prompts = [generator_prompt(q, best if meta["condition"] == "most_preferred" else None) for q in queries]
    model, tok = load_causal_lm(policy, [])
    out = []
    for greedy in (True, False):
        k = 1 if greedy else 8
        rs = generate_responses(model, tok, [p for p in prompts for _ in range(k)], 48, greedy, seed=0)
        g = gold.expected_behavior_batch([q for q in queries for _ in range(k)], [r["response"] for r in rs])["shaped_reward"]
        g = g.reshape(len(queries), k).mean(1)
        out.append(f"{'greedy' if greedy else 'sampled'} {g.mean():.3f} +- {1.96 * g.std() / np.sqrt(len(g)):.3f}")
    print(f"{stage:28s} n={len(queries)} " + "  ".join(out), flush=True)
