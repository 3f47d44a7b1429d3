"""The PPO engine and the aligners at toy size, through the CLI: they learn, resume, and fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from conftest import RL, read_jsonl, summary_of, without_time

TESTS = Path(__file__).parent


@pytest.fixture
def run(rl_run):
    return rl_run  # every test here trains in its own copy of the RL base


def test_a_reward_for_one_word_raises_its_frequency(run, cli, monkeypatch):
    monkeypatch.chdir(TESTS)  # the source is found as a module beside the user, like any user's own
    cli("train-ppo", "--run-dir", run, "--reward-source", "rl_sources:pays_for_the", "--iterations", 16,
        "--prompts-per-iteration", 16, "--rollouts", 1, "--minibatch-size", 16, "--max-new-tokens", 16, "--learning-rate", 3e-3,
        "--sample-every", 8)
    rows = read_jsonl(run / "train-ppo" / "metrics.jsonl")
    count = [r["objective/reward_mean"] for r in rows]  # occurrences of "the" per response
    assert np.mean(count[-4:]) > 2 * np.mean(count[:4]), count
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(run / "train-sft" / "policy")
    after = AutoModelForCausalLM.from_pretrained(run / "train-ppo" / "policy")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    for key in ("objective/kl", "policy/entropy", "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value",
                "objective/return_mean", "time/rollout", "time/score", "time/update"):
        assert key in rows[-1]
    assert len(read_jsonl(run / "train-ppo" / "samples.jsonl")) == 8  # 4 samples at iterations 8 and 16


def test_every_reward_source_scores_through_its_own_tokenizer(run, cli):
    from transformers import AutoTokenizer
    policy = AutoTokenizer.from_pretrained(run / "train-sft" / "policy")
    for judge in ("warmup-discriminator", "train-classifier", "train-reward"):
        assert len(AutoTokenizer.from_pretrained(run / judge / "model")) != len(policy)
    cli("train-rlhf", "--run-dir", run, "--iterations", 2, *RL)
    cli("train-rlhbc", "--run-dir", run, "--iterations", 2, *RL, "--head-weights", "likes=1",
        "--head-weights", "dislikes=-2")
    cli("train-rlhb", "--run-dir", run, "--iterations", 2, *RL, "--reward-form", "probability")
    cli("train-rlhb", "--run-dir", run, "--iterations", 2, *RL, "--no-behavior", "--reward-form",
        "log_probability", "--source-warmup-rounds", 1)
    cli("train-oracle", "--run-dir", run, "--iterations", 2, *RL, "--critic", "shared", "--kl-estimator", "k3")
    for stage, aligner in (("train-rlhf", "RLHF"), ("train-rlhbc", "RLHBC"), ("train-rlhb", "RLHB"),
                           ("train-rlgaf", "RLGAF"), ("train-oracle", "oracle (testbed only)")):
        summary = summary_of(run, stage)
        assert summary["aligner"] == aligner and summary["iterations"] == 2
        assert np.isfinite(summary["reward_final"])
        meta = json.loads((run / stage / "policy" / "policy.json").read_text())
        assert meta["condition"] == "most_preferred" and meta["behavior_text"]
    assert read_jsonl(run / "train-rlgaf" / "metrics.jsonl")[0]["warmup_round"] == 1
    # the paper's second question: RLHB on top of the RLHF policy, beside RLHB from SFT
    cli("train-rlhb", "--run-dir", run, "--iterations", 1, *RL, "--init-from", "train-rlhf", "--stage-name",
        "train-rlhb-on-rlhf")
    manifest = json.loads((run / "train-rlhb-on-rlhf" / "manifest.json").read_text())
    assert "train-rlhf" in manifest["upstream"] and manifest["stage"] == "train-rlhb-on-rlhf"
    assert json.loads((run / "train-rlhb-on-rlhf" / "policy" / "policy.json").read_text())["init_from"] == "train-rlhf"
    status = cli("status", "--run-dir", run).output
    assert "train-rlgaf" in status and "train-oracle" in status


def test_rlhb_discriminator_learns_and_bootstraps_the_top_rewarded(run, cli):
    cli("train-rlhb", "--run-dir", run, "--iterations", 3, *RL, "--rollouts", 2, "--minibatch-size", 16,
        "--bootstrap-ratio", 0.25, "--disc-learning-rate", 1e-3, "--disc-steps", 2, "--checkpoint-every", 1)
    rows = read_jsonl(run / "train-rlhb" / "metrics.jsonl")
    assert [r["disc/bootstrapped"] for r in rows] == [4.0, 4.0, 4.0]  # 25% of 8 prompts x 2 rollouts
    for key in ("disc/loss", "disc/acc_real", "disc/acc_fake", "disc/score_real", "disc/score_fake", "time/disc"):
        assert key in rows[-1]
    state = torch.load(run / "train-rlhb" / "checkpoint.pt", weights_only=False)["source"]["model"]
    from transformers import AutoModelForSequenceClassification
    warmed = AutoModelForSequenceClassification.from_pretrained(run / "warmup-discriminator" / "model").state_dict()
    assert any(not torch.equal(state[k], warmed[k]) for k in warmed)


def test_bootstrap_relabels_exactly_the_top_share(run):
    import datasets
    from rlhb_cli.behaviors.binning import BinSpec
    from rlhb_cli.behaviors.text import BehaviorTemplate
    from rlhb_cli.rl.discriminator_source import AdversarialSettings, DiscriminatorSource
    from rlhb_cli.rl.sources import GeneratedBatch
    from rlhb_cli.models.discriminator import Discriminator
    train = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["train"]
    spec = BinSpec.from_json(json.loads((run / "prepare-behaviors" / "bins.json").read_text()))
    settings = AdversarialSettings("probability", 8, 1e-4, 1, 8, 0, 1, 0.3, 0.0, 0.5, 1.0, 0)
    source = DiscriminatorSource(Discriminator.load(run / "warmup-discriminator" / "model"), settings, train, spec,
                                 BehaviorTemplate.load("en"))
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.3, 0.4, 0.6, 0.0])
    target = train["behavior_text"][0]
    batch = GeneratedBatch([train["query"][0]] * 10, [f"answer {i}" for i in range(10)], [target] * 10, rewards, 1)
    queries, responses, behaviors, labels, origin = source.assemble(batch)
    relabelled = [responses[i] for i in np.flatnonzero(origin == "bootstrap")]
    assert sorted(relabelled) == ["answer 1", "answer 3", "answer 5"]  # int(0.3 * 10) = 3, the highest rewards
    assert labels[torch.as_tensor(origin == "bootstrap")].eq(1).all()
    assert labels[torch.as_tensor(origin == "generated")].eq(0).all() and (origin == "generated").sum() == 7
    assert (origin == "real").sum() == 10 and (origin == "replaced").sum() == 5


def test_a_round_reads_each_pair_once_and_learns_as_if_it_read_every_triplet(run):
    """Factorized discriminator: replaced negatives are drawn on the round's real rows, a step takes whole
    groups of triplets sharing a (query, response), and reading each text once gives the loss and the
    gradient of reading every triplet on its own."""
    import datasets
    from rlhb_cli.behaviors.binning import BinSpec
    from rlhb_cli.behaviors.text import BehaviorTemplate
    from rlhb_cli.rl.discriminator_source import AdversarialSettings, DiscriminatorSource
    from rlhb_cli.rl.sources import GeneratedBatch
    from rlhb_cli.models.discriminator import Discriminator
    train = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["train"]
    spec = BinSpec.from_json(json.loads((run / "prepare-behaviors" / "bins.json").read_text()))
    settings = AdversarialSettings("contrast", 8, 1e-4, 1, 16, 0, 1, 0.0, 0.0, 3.0, 1.0, 0)
    disc = Discriminator.load(run / "warmup-discriminator" / "model")
    assert disc.form == "factorized"
    source = DiscriminatorSource(disc, settings, train, spec, BehaviorTemplate.load("en"))
    batch = GeneratedBatch(train["query"][:4], [f"answer {i}" for i in range(4)], train["behavior_text"][:4],
                           torch.zeros(4), 1)
    queries, responses, behaviors, labels, origin = source.assemble(batch)
    real = {(q, r) for q, r, o in zip(queries, responses, origin) if o == "real"}
    replaced = [(q, r) for q, r, o in zip(queries, responses, origin) if o == "replaced"]
    assert len(replaced) == 12 and set(replaced) <= real
    groups = source._groups(queries, responses, behaviors)
    assert sorted(i for g in groups for i in g) == list(range(len(queries)))
    assert all(len({(queries[i], responses[i]) for i in g}) == 1 for g in groups)
    assert len(groups) < len(queries)

    model = disc.judge.model
    model.train()
    pick = [i for g in groups[:3] for i in g]
    args = ([queries[i] for i in pick], [responses[i] for i in pick], [behaviors[i] for i in pick])
    assert len(set(zip(args[0], args[1]))) < len(pick)  # the batch repeats texts
    read, encode = [], disc.judge.encode
    disc.judge.encode = lambda texts: read.extend(texts) or encode(texts)
    loss, logit = disc.training_loss(*args, labels[torch.tensor(pick)], 0.0, 1.0)
    disc.judge.encode = encode
    assert len(read) == 3  # three groups, three texts read
    loss.backward()
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    one_by_one = torch.cat([disc.judge.forward_logits(disc.judge.encode(disc.texts([q], [r], [b])))
                            for q, r, b in zip(*args)])
    expected_loss, expected_logit = disc.loss_from_raw(one_by_one, labels[torch.tensor(pick)], disc.levels(args[2]),
                                                       disc.marginals(args[2]), 0.0, 1.0)
    expected_loss.backward()
    assert torch.allclose(logit, expected_logit, atol=1e-5) and torch.allclose(loss, expected_loss, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(shared, model.parameters()))


def test_contrast_reward_by_hand_over_all_metrics_or_some(run):
    """The contrast: logit D(q, r, asked) minus the mean over the contrast set; over chosen metrics, the
    difference of those metrics' log-probabilities alone."""
    import datasets
    from rlhb_cli.behaviors.binning import METRICS, BinSpec
    from rlhb_cli.behaviors.text import BehaviorTemplate
    from rlhb_cli.prompts import judge_text
    from rlhb_cli.rl.discriminator_source import AdversarialSettings, DiscriminatorSource
    from rlhb_cli.models.discriminator import Discriminator
    train = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["train"]
    spec = BinSpec.from_json(json.loads((run / "prepare-behaviors" / "bins.json").read_text()))
    template = BehaviorTemplate.load("en")
    asked = template.most_preferred(spec)
    queries, responses = train["query"][:3], ["answer one", "answer two", train["response"][2]]
    disc = Discriminator.load(run / "warmup-discriminator" / "model")
    raw = disc.judge.logits([judge_text(q, r) for q, r in zip(queries, responses)])

    def log_p(i: int, behavior: str, metrics) -> float:  # one triplet's log-probabilities, summed by hand
        levels, start, total = disc.levels([behavior])[0], 0, 0.0
        for m, metric in enumerate(METRICS):
            size = disc.judge.meta.heads[metric]
            if metric in metrics:
                total += float(torch.log_softmax(raw[i, start:start + size], -1)[levels[m]])
            start += size
        return total

    for metrics in (None, ("likes", "dislikes")):
        settings = AdversarialSettings("contrast", 4, 1e-4, 0, 16, 0, 1, 0.0, 0.0, 3.0, 1.0, 0, metrics)
        source = DiscriminatorSource(disc, settings, train, spec, template)
        reward, _ = source.score(queries, responses, [asked] * 3)
        for i, q in enumerate(queries):
            others = source.contrast_set(q, asked)
            assert len(others) == 4 and asked not in others
            if metrics is None:  # the whole logit: every metric and the behaviour's log-marginal
                expected = float(disc.logits([q], [responses[i]], [asked])[0]) - np.mean(
                    [float(disc.logits([q], [responses[i]], [b])[0]) for b in others])
            else:
                expected = log_p(i, asked, metrics) - np.mean([log_p(i, b, metrics) for b in others])
            assert float(reward[i]) == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(run, cli):
    args = ["--iterations", 4, *RL, "--disc-steps", 2, "--disc-learning-rate", 1e-3, "--bootstrap-ratio", 0.25,
            "--checkpoint-every", 2]
    twin = run.parent / "twin"
    shutil.copytree(run, twin)
    cli("train-rlhb", "--run-dir", run, *args)
    cli("train-rlhb", "--run-dir", twin, *args, "--stop-after-steps", 2)
    assert json.loads((twin / "train-rlhb" / "manifest.json").read_text())["status"] == "stopped"
    assert len(read_jsonl(twin / "train-rlhb" / "metrics.jsonl")) == 2
    cli("train-rlhb", "--run-dir", twin, *args, "--resume")
    first = without_time(read_jsonl(run / "train-rlhb" / "metrics.jsonl"))
    resumed = without_time(read_jsonl(twin / "train-rlhb" / "metrics.jsonl"))
    assert len(first) == 4 and first == resumed
    cli("train-rlhb", "--run-dir", twin, *args, "--force")
    assert without_time(read_jsonl(twin / "train-rlhb" / "metrics.jsonl")) == first


def test_micro_batches_make_the_mini_batchs_update(run, cli):
    """A mini-batch of 8 in micro-batches of 3, 3 and 2: the same figures and weights as in one pass, up to
    float rounding (one iteration: later rollouts would sample from the rounded weights)."""
    from safetensors.torch import load_file
    args = ["--iterations", 1, *RL, "--ppo-epochs", 2]
    cli("train-rlhb", "--run-dir", run, *args, "--stage-name", "whole")
    cli("train-rlhb", "--run-dir", run, *args, "--stage-name", "micro", "--micro-batch-size", 3)
    whole, micro = (without_time(read_jsonl(run / name / "metrics.jsonl"))[0] for name in ("whole", "micro"))
    assert whole.keys() == micro.keys()
    for key, value in whole.items():
        assert micro[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    weights = [load_file(run / name / "policy" / "model.safetensors") for name in ("whole", "micro")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6)
    base = load_file(run / "train-sft" / "policy" / "model.safetensors")
    moved = max(float((weights[0][k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-5  # the update did move the weights, by more than the tolerance


def test_kl_above_its_bound_warns_or_stops(run, cli):
    cli("train-rlhf", "--run-dir", run, "--iterations", 2, *RL, "--kl-bound", 0.0, "--kl-estimator", "k3",
        "--learning-rate", 1e-3)
    warnings = summary_of(run, "train-rlhf")["warnings"]
    assert warnings and "iteration 2: KL to the reference" in warnings[-1]
    result = cli("train-rlhf", "--run-dir", run, "--iterations", 2, *RL, "--kl-bound", 0.0, "--kl-estimator", "k3",
                 "--learning-rate", 1e-3, "--stop-on-kl-bound", "--force", ok=False)
    assert result.exit_code == 2 and "above the bound" in result.output and "checkpoint-failed.pt" in result.output


def test_failures_are_one_clear_line(run, cli, monkeypatch):
    monkeypatch.chdir(TESTS)
    result = cli("train-ppo", "--run-dir", run, "--reward-source", "rl_sources:pays_nan", "--iterations", 2, *RL,
                 ok=False)
    assert result.exit_code == 2 and "non-finite rewards in iteration 1" in result.output
    assert "checkpoint-failed.pt" in result.output and "Traceback" not in result.output
    for args, message in (
        (["train-ppo", "--reward-source", "rl_sources"], "package.module:callable"),
        (["train-ppo", "--reward-source", "rl_sources:not_a_source"], "without a score() method"),
        (["train-ppo", "--reward-source", "nowhere:thing"], "cannot import it"),
        (["train-rlhf", "--minibatch-size", 3], "not a multiple of minibatch_size"),
        (["train-rlhf", "--rollouts", 1, "--minibatch-size", 8, "--group-baseline"], "group_baseline needs"),
        (["train-rlhb", "--no-behavior", "--reward-form", "contrast"], "with --no-behavior use probability"),
        (["train-rlhbc", "--head-weights", "stars=1"], "'stars' is not a metric"),
        (["train-rlhf", "--init-from", "/nonexistent/policy"], "no such starting policy"),
        (["train-rlhf", "--init-from", "train-rlhbc"], "rlhb train-rlhbc --run-dir"),
    ):
        result = cli(*args, "--run-dir", run, ok=False)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_a_collapsed_discriminator_is_reported():
    from rlhb_cli.rl.discriminator_source import CollapseWatch
    watch = CollapseWatch(threshold=0.95, iterations=3)
    flags, warnings = [], []
    for iteration, score in enumerate([0.97, 0.99, 0.5, 0.96, 0.98, 0.99, 0.99], start=1):
        row = {"disc/score_fake": score}
        warnings.append(watch.observe(row, iteration))
        flags.append(row["disc/collapsed"])
    assert flags == [0, 0, 0, 0, 0, 1, 1] and watch.collapsed_at == 6
    assert [i for i, w in enumerate(warnings, 1) if w] == [6] and "since iteration 4" in warnings[5]


def test_frozen_by_default_and_variant_defaults_are_resolved(run, cli):
    cli("train-rlhb", "--run-dir", run, "--iterations", 1, *RL)
    config = json.loads((run / "train-rlhb" / "manifest.json").read_text())["config"]
    assert config["disc_steps"] == 0 and config["reward_scale"] == 0.05 and config["source_warmup_rounds"] == 0
    assert config["length_debias"] is True
    assert "objective/length_slope" in read_jsonl(run / "train-rlhb" / "metrics.jsonl")[0]
    assert not any(k.startswith("disc/loss") for k in read_jsonl(run / "train-rlhb" / "metrics.jsonl")[0])
    cli("train-rlhb", "--run-dir", run, "--iterations", 1, *RL, "--no-behavior", "--reward-form", "probability",
        "--source-warmup-rounds", 1)
    config = json.loads((run / "train-rlgaf" / "manifest.json").read_text())["config"]
    assert config["disc_steps"] == 2 and config["reward_scale"] == 1.0 and config["length_debias"] is False


def test_best_logged_condition_asks_for_the_behaviour_with_the_best_logged_reward(run, cli):
    from rlhb_cli.behaviors.text import best_logged
    from rlhb_cli.errors import RlhbError
    texts = ["a"] * 3 + ["b"] * 2 + ["c"]
    assert best_logged(texts, [0.1, 0.2, 0.3, 0.5, 0.6, 0.9], min_rows=2) == "b"  # "c" is best but too rare
    assert best_logged(texts, [0.1, 0.2, 0.3, 0.5, 0.6, 0.9], min_rows=1) == "c"
    with pytest.raises(RlhbError, match="no logged behaviour has 4 training rows"):
        best_logged(texts, [0.0] * 6, min_rows=4)

    train = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["train"]
    rows: dict[str, list[float]] = {}
    for text, reward in zip(train["behavior_text"], train["shaped_reward"]):
        rows.setdefault(text, []).append(reward)
    means = {t: sum(r) / len(r) for t, r in rows.items() if len(r) >= 5}
    expected = max(sorted(means), key=means.get)
    cli("train-rlhb", "--run-dir", run, "--iterations", 1, *RL, "--condition", "best_logged",
        "--condition-min-rows", 5, "--sample-every", 1)
    meta = json.loads((run / "train-rlhb" / "policy" / "policy.json").read_text())
    assert meta["condition"] == "best_logged" and meta["behavior_text"] == expected
    assert {r["behavior"] for r in read_jsonl(run / "train-rlhb" / "samples.jsonl")} == {expected}


def test_evaluate_judges_every_policy_with_intervals(run, cli, monkeypatch):
    cli("train-oracle", "--run-dir", run, "--iterations", 2, *RL)
    cli("train-rlhf", "--run-dir", run, "--iterations", 1, *RL, "--stage-name", "my-rlhf")
    from chat_server import ChatServer
    evaluate = ["evaluate", "--run-dir", run, "--samples", 2, "--bootstrap-samples", 200, "--max-new-tokens", 12,
                "--following-queries", 6]
    with ChatServer() as server:
        cli(*evaluate, "--judge-url", server.url, "--judge-requests-per-minute", 0)
        summary = summary_of(run, "evaluate")
        assert 0 < summary["chat_judge"]["calls"] == len(server.requests) <= 3 * summary["queries"]  # greedy only
        cli(*evaluate, "--judge-url", server.url, "--judge-requests-per-minute", 0, "--force")
        assert summary_of(run, "evaluate")["chat_judge"]["calls"] == 0  # the cache answers a rerun
    cli(*evaluate, "--force")
    summary = summary_of(run, "evaluate")
    assert summary["policies"] == ["train-sft", "train-oracle", "my-rlhf"]
    assert summary["judges"] == ["gold", "annotators", "reward_model", "classifier", "discriminator"]
    detail = json.loads((run / "evaluate" / "summary_detail.json").read_text())
    for judge in summary["judges"]:
        entry = detail["scores"]["train-oracle"]["sampled"][judge]
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        assert sum(entry["win_tie_loss"].values()) == pytest.approx(1.0, abs=1e-3)  # each rounded to 4 places
        assert entry["gain_over_baseline"]["answer_draw_se"] > 0  # two samples a query: their draw is measured
        assert "answer_draw_se" not in detail["scores"]["train-oracle"]["greedy"][judge]["gain_over_baseline"]
    assert detail["health"]["train-sft"]["kl_to_baseline"] == pytest.approx(0.0, abs=1e-4)
    assert detail["health"]["train-oracle"]["perplexity_real_responses"] > 1
    trust = detail["health"]["train-oracle"]["judge_agreement_with_gold"]
    assert set(trust) == {"annotators", "reward_model", "classifier", "discriminator"}
    competence = detail["health"]["train-sft"]["reward_model_agreement_with_annotators"]
    assert 0 <= competence["pair_agreement"] <= 1  # what a recipe asks of RLHF's reward model before its claims
    users, raters = (detail["scores"]["train-oracle"]["sampled"][j]["mean"] for j in ("gold", "annotators"))
    assert users != raters  # two tastes read from the same answers
    assert all(0 <= t["pair_agreement"] <= 1 for t in trust.values() if t["pair_agreement"] is not None)
    bins = json.loads((run / "prepare-behaviors" / "bins.json").read_text())
    following = detail["health"]["train-sft"]["behavior_following"]
    assert len(following["likes"]["judged_rate_per_level"]) == len(bins["edges"]["likes"]) + 1
    assert -1 <= following["dislikes"]["spearman"] <= 1 or np.isnan(following["dislikes"]["spearman"])
    assert detail["references"]["best_in_pool"]["mean"] > detail["references"]["pool_mean"]["mean"]
    rows = read_jsonl(run / "evaluate" / "results.jsonl")
    assert len(rows) == 3 * summary["queries"] * (1 + 2)
    assert set(rows[0]["scores"]) == set(summary["judges"])
    from rlhb_cli.simulator.attributes import FEATURES
    rates = detail["health"]["train-oracle"]["sampled"]["gold_feature_rates"]
    mine = [r for r in rows if r["policy"] == "train-oracle" and r["decoding"] == "sampled"]
    assert list(rates) == list(FEATURES) and set().union(*(r["gold_features"] for r in mine)) <= set(FEATURES)
    assert rates["correct"] == pytest.approx(np.mean(["correct" in r["gold_features"] for r in mine]), abs=1e-4)
    on_train = ["evaluate", "--run-dir", run, "--stage-name", "evaluate-train", "--query-set", "train",
                "--max-queries", 5, "--samples", 1, "--max-new-tokens", 8, "--following-queries", 0,
                "--policies", "train-sft"]
    cli(*on_train)
    trained_on = set(datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["train"]["query"])
    train_rows = read_jsonl(run / "evaluate-train" / "results.jsonl")
    assert len({r["query"] for r in train_rows}) == 5 and {r["query"] for r in train_rows} <= trained_on
    assert {r["query_set"] for r in train_rows} == {"train"}
    cli("evaluate", "--run-dir", run, "--stage-name", "evaluate-wide", "--query-set", "every-held-out", "--samples", 0,
        "--max-new-tokens", 4, "--following-queries", 0, "--policies", "train-sft")
    wide = summary_of(run, "evaluate-wide")
    assert wide["query_sets"] == {"test": summary["query_sets"]["test"], "environment": summary["query_sets"][
        "environment"], "world": wide["queries"] - summary["queries"]} and wide["queries"] > summary["queries"]
    twin = run.parent / "twin"  # a second run dir: the report aggregates runs
    shutil.copytree(run, twin)
    result = cli("report", "--run-dir", run, "--run-dir", twin)
    report = (run / "report" / "report.md").read_text()
    assert "No train-rlhb policy was evaluated." in result.output and "report.md" in result.output
    assert "## Two golds: the platform's users and the annotators" in report
    from rlhb_cli.stages.sft import convergence_note
    sft = summary_of(run, "train-sft")  # the fixture's toy SFT (2 epochs) stops short of convergence
    note = convergence_note(sft["val_perplexity_by_epoch"])
    assert note in sft["notes"] and f"- train-sft (run dir 1 of 2): {note}." in report
    import rlhb_cli.evaluation.report as report_module  # had both converged (no note), the report would not say so
    monkeypatch.setattr(report_module, "convergence_note", lambda by_epoch: None)
    cli("report", "--run-dir", run, "--run-dir", twin)
    monkeypatch.undo()
    assert "short of convergence" not in (run / "report" / "report.md").read_text()
    for part in ("## Headline", "| my-rlhf |", "(best in pool)", "![training curves](curves.png)",
                 "## Can the judges be trusted?", "## Behaviour following", "## Sample answers",
                 "## What the answers became", "| train-sft | " + " | ".join(f"{r:.3f}" for r in
                 detail["health"]["train-sft"]["sampled"]["gold_feature_rates"].values())):
        assert part in report, part
    import matplotlib.image
    for png in ("curves.png", "win_tie_loss.png"):  # valid images with something drawn on them
        pixels = matplotlib.image.imread(run / "report" / png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.01
    assert "answers' draw ±" not in report  # two run dirs: the spread over runs, not one evaluation's draw
    cli("report", "--run-dir", run)
    draw = detail["scores"]["my-rlhf"]["sampled"]["gold"]["gain_over_baseline"]["answer_draw_se"]
    assert f"(answers' draw ±{draw:.3f}) |" in (run / "report" / "report.md").read_text()
    result = cli("report", "--run-dir", run.parent / "nothing", ok=False)
    assert result.exit_code == 2 and "rlhb evaluate --run-dir" in result.output


def test_probe_keeps_the_best_policy_and_stops_early(run, cli):
    cli("train-rlhbc", "--run-dir", run, "--iterations", 6, *RL, "--probe-every", 1, "--probe-queries", 8,
        "--keep-best", "--early-stop-patience", 2, "--learning-rate", 3e-3)
    rows = read_jsonl(run / "train-rlhbc" / "metrics.jsonl")
    probes = [r["probe/reward_mean"] for r in rows]
    summary = summary_of(run, "train-rlhbc")
    assert summary["probe_best"] == pytest.approx(max(probes), abs=1e-4)
    best_at = int(np.argmax(probes)) + 1
    assert summary["probe_best_iteration"] == best_at
    assert json.loads((run / "train-rlhbc" / "policy" / "policy.json").read_text())["iteration"] == best_at
    # stopped as soon as two probes in a row failed to beat the best, or ran to the end
    assert summary["stopped_early"] == (len(rows) < 6)
    if summary["stopped_early"]:
        assert len(rows) - best_at == 2


def test_group_baseline_pays_answers_against_their_siblings_and_leaves_the_probe_alone(run, cli):
    args = ["--prompts-per-iteration", 4, "--rollouts", 2, "--minibatch-size", 8, "--max-new-tokens", 12,
            "--sample-every", 0, "--iterations", 2, "--group-baseline", "--probe-every", 1, "--probe-queries", 7]
    cli("train-rlhbc", "--run-dir", run, *args, "--stage-name", "rlhbc-grouped")
    rows = read_jsonl(run / "rlhbc-grouped" / "metrics.jsonl")
    for row in rows:  # each prompt's answers are paid their difference: the paid rewards sum to zero
        assert abs(row["objective/paid_mean"]) < 1e-6 and abs(row["objective/reward_mean"]) > 1e-4
        assert "probe/reward_mean" in row  # 7 greedy answers, one per query: nothing to group


def test_packed_generation_multiplies_as_the_plain_layers_and_puts_them_back(run, cli):
    """--packed-generation: every linear layer through oneDNN's packed product, equal to the plain one up to
    float rounding, the model's own layers back afterwards (also on an error), refused off float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhb_cli.errors import RlhbError
    from rlhb_cli.models.generation import HFGenerator, check_packing, packed_linears
    policy = run / "train-sft" / "policy"
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    ids = torch.randint(5, 300, (3, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model, 3):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
            packed = model(input_ids=ids).logits
        with pytest.raises(KeyError), packed_linears(model, 3):
            raise KeyError("inside")
        again = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, plain)
    generator = HFGenerator(tokenizer, 6, 1.0, packed=True)
    out = generator.generate(model, ids, torch.ones_like(ids), greedy=True)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 6
    with pytest.raises(RlhbError, match="float32"):
        check_packing(model.to(torch.bfloat16))
    cli("train-rlhb", "--run-dir", run, "--iterations", 1, *RL, "--packed-generation")
    assert read_jsonl(run / "train-rlhb" / "metrics.jsonl")[0]["gen/length"] > 0


def test_dpo_on_the_preference_tree_widens_the_margin_and_rejects_broken_pairs(run, cli):
    """ALOE's stage on the tiny policy: the DPO loss falls and the validation pairs' chosen-over-rejected
    margin rises; a pairs file with broken rows has each one written down with its line and reason."""
    cli("simulate-conversations", "--run-dir", run, "--personas", 200, "--eval-personas", 20, "--conversations", 150,
        "--turns", 3)
    cli("train-dpo", "--run-dir", run, "--epochs", 2, "--batch-size", 16)
    summary = summary_of(run, "train-dpo")
    losses = [r["loss/train"] for r in read_jsonl(run / "train-dpo" / "metrics.jsonl") if "loss/train" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    before, after = summary["validation_before"], summary["validation_after"]
    assert after["rewards/margins"] > before["rewards/margins"] + 0.05
    assert after["loss"] < before["loss"]
    assert summary["pairs_rejected"] == 0 and summary["train_pairs"] + summary["validation_pairs"] == summary["pairs_read"]
    meta = json.loads((run / "train-dpo" / "policy" / "policy.json").read_text())
    assert meta["condition"] == "none" and meta["conversation"]
    resumable = ["--stage-name", "dpo-resumed", "--epochs", 2, "--batch-size", 16, "--checkpoint-every", 5]
    cli("train-dpo", "--run-dir", run, *resumable, "--stop-after-steps", 7)
    assert json.loads((run / "dpo-resumed" / "manifest.json").read_text())["status"] == "stopped"
    cli("train-dpo", "--run-dir", run, *resumable, "--resume")
    resumed = summary_of(run, "dpo-resumed")
    assert resumed["steps"] == summary["steps"]
    assert resumed["validation_after"]["loss"] == pytest.approx(after["loss"], abs=1e-4)

    good = read_jsonl(run / "simulate-conversations" / "preference_tree.jsonl")[:40]
    broken = [{"messages": [{"content": "hi"}], "chosen": "a", "rejected": "b"},
              {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "chosen": "a",
               "rejected": "b"},
              {"messages": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"}]
    pairs = run / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in good[:20] + broken + good[20:]) + "{not json\n")
    result = cli("train-dpo", "--run-dir", run, "--pairs", pairs, "--epochs", 1, "--batch-size", 8, "--force")
    rejected = read_jsonl(run / "train-dpo" / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [21, 22, 23, 44]
    assert "turn 1 has no role" in rejected[0]["reason"] and "last turn is not the user's" in rejected[1]["reason"]
    assert "the same reply" in rejected[2]["reason"] and "not JSON" in rejected[3]["reason"]
    assert summary_of(run, "train-dpo")["pairs_rejected"] == 4, result.output
    cli("evaluate-personalization", "--run-dir", run, "--instances", 12, "--turns", 3, "--policies", "train-sft",
        "--policies", "train-dpo", "--bootstrap-samples", 200)
    figures = json.loads((run / "evaluate-personalization" / "personalization.json").read_text())
    assert list(figures) == ["average-user reply", "train-sft", "train-dpo"]
    for row in figures.values():
        assert len(row["AL"]) == 3 and all(0 <= a <= 100 for a in row["AL"])
        assert row["IR_interval"][0] <= row["IR"] <= row["IR_interval"][1]
    assert (run / "evaluate-personalization" / "al_curves.png").stat().st_size > 0
    talks = read_jsonl(run / "evaluate-personalization" / "conversations.jsonl")
    by_policy = {name: [t for t in talks if t["policy"] == name] for name in figures}
    openings = {name: [(t["persona"], t["turns"][0]["user"]) for t in rows] for name, rows in by_policy.items()}
    assert openings["train-sft"] == openings["train-dpo"] == openings["average-user reply"]  # the same instances
    later = {name: [t["turns"][1]["user"] for t in rows] for name, rows in by_policy.items()}
    assert later["average-user reply"] != later["train-sft"]  # the user answered to what each policy said


def test_a_policy_told_the_persona_is_trained_and_asked_with_each_users_description(run, cli, tmp_path, monkeypatch):
    """The personalisation suite's upper bound: SFT on the tree's preferred replies with the persona's
    description in every prompt; a pair whose persona is unknown is rejected with its line; at evaluation the
    told policy is asked with each user's description, any other policy never sees it."""
    from rlhb_cli.evaluation import personalization
    cli("simulate-conversations", "--run-dir", run, "--personas", 200, "--eval-personas", 20, "--conversations", 150,
        "--turns", 3)
    tree = run / "simulate-conversations"
    (tmp_path / "personas.jsonl").write_text((tree / "personas.jsonl").read_text())
    rows = read_jsonl(tree / "preference_tree.jsonl")[:60]
    rows[4]["persona"] = "persona-99999"
    (tmp_path / "tree.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("train-dpo", "--run-dir", run, "--stage-name", "told", "--told-persona", "--dpo-weight", 0,
        "--pairs", tmp_path / "tree.jsonl", "--epochs", 1, "--batch-size", 8)
    assert read_jsonl(run / "told" / "rejected.jsonl") == [
        {"line": 5, "reason": f"field 'persona': 'persona-99999' is not in {tmp_path / 'personas.jsonl'}"}]
    meta = json.loads((run / "told" / "policy" / "policy.json").read_text())
    assert meta["condition"] == "persona" and meta["aligner"] == "SFT on preferred replies"
    assert "personas.jsonl" in (run / "told" / "manifest.json").read_text()
    prompts = []
    monkeypatch.setattr(personalization, "generate_responses",
                        lambda model, tokenizer, batch, *a, **k: prompts.extend(batch) or [{"response": "ok"}] * len(batch))
    talk = [[{"role": "user", "content": "What is the capital of Chile?"}]]
    personalization.policy_replier(run / "told" / "policy", [], 0)(talk, ["A user who loves sources."], 8)
    personalization.policy_replier(run / "train-sft" / "policy", [], 0)(talk, ["A user who loves sources."], 8)
    assert "A user who loves sources." in prompts[0] and "A user who loves sources." not in prompts[1]
    (tmp_path / "personas.jsonl").unlink()
    refused = cli("train-dpo", "--run-dir", run, "--stage-name", "told-2", "--told-persona", "--pairs",
                  tmp_path / "tree.jsonl", ok=False)
    assert refused.exit_code != 0 and "--told-persona: no " in refused.output and "Traceback" not in refused.output
