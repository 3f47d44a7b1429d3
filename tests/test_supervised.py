"""The supervised stages at toy size through the CLI: each learns, saves, reloads, resumes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import read_jsonl, summary_of, write_jsonl

TINY = ["--tiny-hidden-size", 32, "--tiny-layers", 1, "--tiny-heads", 2, "--tiny-vocab-size", 400]
SFT = ["--epochs", 1, "--max-train-rows", 1024, "--batch-size", 32, "--learning-rate", 1e-2, *TINY]


@pytest.fixture(scope="module")
def sft_run(small_sim, tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    shutil.copytree(small_sim, run_dir)
    cli("prepare-behaviors", "--run-dir", run_dir)
    cli("train-sft", "--run-dir", run_dir, *SFT)
    return run_dir


@pytest.fixture
def run(sft_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(sft_run, target)
    return target


def test_sft_learns_and_leaves_a_loadable_policy(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    summary = summary_of(sft_run, "train-sft")
    assert summary["val_perplexity"] < summary["untrained_val_perplexity"] / 5
    assert summary["val_perplexity_by_epoch"] == [summary["val_perplexity"]]  # one epoch, read from the log
    rows = read_jsonl(sft_run / "train-sft" / "metrics.jsonl")
    losses = [r["loss/train"] for r in rows if "loss/train" in r]
    assert losses[-1] < losses[0]
    policy = AutoModelForCausalLM.from_pretrained(sft_run / "train-sft" / "policy")
    init = AutoModelForCausalLM.from_pretrained(sft_run / "train-sft" / "init")
    assert not torch.equal(policy.model.layers[0].mlp.up_proj.weight, init.model.layers[0].mlp.up_proj.weight)
    tokenizer = AutoTokenizer.from_pretrained(sft_run / "train-sft" / "policy")
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>" and tokenizer.chat_template
    manifest = json.loads((sft_run / "train-sft" / "manifest.json").read_text())
    assert "prepare-behaviors" in manifest["upstream"] and manifest["status"] == "done"


def test_an_sft_policy_still_improving_in_its_last_epoch_is_noted():
    from rlhb_cli.stages.sft import convergence_note, perplexity_by_epoch
    history = [{"eval_loss": 6.92, "epoch": 0}, {"loss": 1.2, "epoch": 0.5}, {"eval_loss": 0.5659, "epoch": 1.0},
               {"eval_loss": 0.4366, "epoch": 2.0}, {"eval_loss": 0.4366, "epoch": 2.0}]  # the final evaluate again
    assert perplexity_by_epoch(history) == [1.761, 1.547]
    note = convergence_note(perplexity_by_epoch(history))  # the demo's 2-epoch policy: 12% in its last epoch
    assert note is not None and "fell 12%" in note and "1.761 -> 1.547" in note
    assert convergence_note([1.749, 1.409, 1.369]) is None  # its 3-epoch policy: 3%, converged enough
    assert convergence_note([1.5]) is None


def test_sft_resume_gives_the_uninterrupted_numbers(run, cli):
    other = run.parent / "other"
    shutil.copytree(run, other)
    cli("train-sft", "--run-dir", run, *SFT, "--force", "--checkpoint-every", 5, "--stop-after-steps", 7)
    state = json.loads((run / "train-sft" / "manifest.json").read_text())["status"]
    assert state == "stopped"
    result = cli("prepare-behaviors", "--run-dir", run)  # unaffected; a later stage would refuse train-sft
    cli("train-sft", "--run-dir", run, *SFT, "--checkpoint-every", 5, "--resume")
    cli("train-sft", "--run-dir", other, *SFT, "--checkpoint-every", 5, "--force")
    resumed, straight = summary_of(run, "train-sft"), summary_of(other, "train-sft")
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-4)
    assert result.exit_code == 0


def test_sft_scores_a_validation_budget_once_after_training(run, cli):
    """--max-val-rows spreads its rows over the split, and the trained model is scored once: its figure is
    the epoch-end evaluation, not a second pass over the same rows."""
    full = summary_of(run, "train-sft")
    cli("train-sft", "--run-dir", run, *SFT, "--max-val-rows", 50, "--force")
    summary = summary_of(run, "train-sft")
    assert summary["val_rows"] == 50 < full["val_rows"]
    evaluations = [r for r in read_jsonl(run / "train-sft" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, summary["steps"]]  # untrained, then the epoch's end only
    assert summary["val_loss"] == round(evaluations[-1]["eval/loss"], 4)


def test_discriminator_learns_saves_and_reloads(run, cli):
    cli("warmup-discriminator", "--run-dir", run, "--epochs", 3, "--max-train-rows", 3000, "--learning-rate", 3e-3)
    summary = summary_of(run, "warmup-discriminator")
    assert summary["form"] == "factorized"
    assert summary["parameters_changed"] and summary["val_auc"] > 0.6
    assert summary["bayes_ceiling_auc"] is not None
    losses = [r["loss/train"] for r in read_jsonl(run / "warmup-discriminator" / "metrics.jsonl") if "loss/train" in r]
    assert np.mean(losses[-3:]) < losses[0]
    from rlhb_cli.models.discriminator import Discriminator
    import datasets
    validation = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))["validation"]
    loaded = Discriminator.load(run / "warmup-discriminator" / "model")
    again = Discriminator.load(run / "warmup-discriminator" / "model")
    args = (validation["query"][:20], validation["response"][:20], validation["behavior_text"][:20])
    scores = loaded.probability(*args)
    assert torch.equal(scores, again.probability(*args)) and scores.shape == (20,)
    assert float(scores.mean()) == pytest.approx(float(loaded.probability(*args).mean()))


def test_joint_discriminator_form_trains(run, cli):
    cli("warmup-discriminator", "--run-dir", run, "--form", "joint", "--epochs", 1, "--max-train-rows", 300)
    summary = summary_of(run, "warmup-discriminator")
    assert summary["form"] == "joint" and summary["parameters_changed"] and 0 <= summary["val_auc"] <= 1


def warmup_stopped_and_straight(run, cli, args, stop_after: int):
    """(summary of a warm-up stopped after `stop_after` steps and resumed, of the same warm-up uninterrupted
    in a copy of the run dir, that copy)."""
    other = run.parent / "straight"
    shutil.copytree(run, other)
    cli("warmup-discriminator", "--run-dir", run, *args, "--stop-after-steps", stop_after)
    cli("warmup-discriminator", "--run-dir", run, *args, "--resume")
    cli("warmup-discriminator", "--run-dir", other, *args)
    return summary_of(run, "warmup-discriminator"), summary_of(other, "warmup-discriminator"), other


def test_a_frozen_minilm_discriminator_learns_its_head_alone_and_resumes(run, cli):
    """--freeze-backbone: the pretrained body is read once per text and never changes; the head learns;
    its cached-feature path gives the model's own logits; an interrupted warm-up resumes to the same
    numbers; during RL the discriminator's updates and checkpoints touch the head alone."""
    import datasets
    from transformers import AutoModel
    from rlhb_cli.behaviors.binning import BinSpec
    from rlhb_cli.behaviors.text import BehaviorTemplate
    from rlhb_cli.models.load import minilm_path
    from rlhb_cli.prompts import judge_text
    from rlhb_cli.rl.discriminator_source import AdversarialSettings, DiscriminatorSource
    from rlhb_cli.rl.sources import GeneratedBatch
    from rlhb_cli.models.discriminator import Discriminator
    args = ["--backbone", "minilm", "--freeze-backbone", "--epochs", 2, "--max-train-rows", 400,
            "--learning-rate", 2e-2, "--checkpoint-every", 10]
    resumed, straight, _ = warmup_stopped_and_straight(run, cli, args, stop_after=15)
    assert resumed["val_auc"] == pytest.approx(straight["val_auc"], abs=1e-6) and straight["val_auc"] > 0.55
    assert straight["frozen_backbone"] and straight["parameters_trained"] < straight["parameters"] / 50
    kept = torch.load(run / "warmup-discriminator" / "checkpoint.pt", weights_only=False)["model"]
    assert kept and all(k.startswith(("bert.pooler.", "classifier.")) for k in kept)  # not the frozen body

    disc = Discriminator.load(run / "warmup-discriminator" / "model")
    assert disc.judge.frozen_body
    pretrained = AutoModel.from_pretrained(minilm_path()).state_dict()
    body = disc.judge.model.base_model.state_dict()
    assert all(torch.equal(body[k], pretrained[k]) for k in pretrained if not k.startswith("pooler."))
    assert not torch.equal(body["pooler.dense.weight"], pretrained["pooler.dense.weight"])
    prepared = datasets.load_from_disk(str(run / "prepare-behaviors" / "dataset"))
    validation, train = prepared["validation"], prepared["train"]
    texts = [judge_text(q, r) for q, r in zip(validation["query"][:12], validation["response"][:12])]
    batch = disc.judge.encode(texts)
    with torch.no_grad():
        own = disc.judge.model.eval()(**batch).logits
    assert torch.allclose(disc.judge.logits(texts), own, atol=1e-5)

    spec = BinSpec.from_json(json.loads((run / "prepare-behaviors" / "bins.json").read_text()))
    source = DiscriminatorSource(disc, AdversarialSettings("contrast", 8, 1e-3, 2, 16, 0, 1, 0.0, 0.0, 1.0, 1.0, 0),
                                 train, spec, BehaviorTemplate.load("en"))
    before = {k: v.clone() for k, v in disc.judge.model.state_dict().items()}
    n = 8
    source.update(GeneratedBatch(train["query"][:n], [f"an answer {i}" for i in range(n)],
                                 [train["behavior_text"][0]] * n, torch.zeros(n), 1))
    after = disc.judge.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("bert.pooler.", "classifier.")) for k in moved)
    assert set(source.state_dict()["model"]) == {k for k in before if k.startswith(("bert.pooler.", "classifier."))}
    refused = cli("train-rlhb", "--run-dir", run, "--iterations", 1, "--disc-lora-r", 4, ok=False)
    assert "learns its head alone on a frozen body" in refused.output and "Traceback" not in refused.output

    from rlhb_cli.models.classifier import BehaviorClassifier
    cli("train-classifier", "--run-dir", run, "--backbone", "minilm", "--freeze-backbone", "--epochs", 2,
        "--max-train-rows", 300)
    summary = summary_of(run, "train-classifier")
    assert summary["frozen_backbone"] and summary["parameters_trained"] < summary["parameters"] / 50
    assert summary["mean_accuracy_gain"] > 0  # above the majority class on average
    classifier = BehaviorClassifier.load(run / "train-classifier" / "model")
    body = classifier.judge.model.base_model.state_dict()
    assert all(torch.equal(body[k], pretrained[k]) for k in pretrained if not k.startswith("pooler."))
    expected = classifier.expected_behavior(validation["query"][:5], validation["response"][:5])["shaped_reward"]
    assert np.isfinite(expected).all() and len(expected) == 5


def test_a_minilm_discriminator_learning_its_top_layer_only_keeps_the_rest_and_resumes(run, cli):
    """--train-top-layers 1: embeddings and the five lower layers stay the pretrained ones byte for byte, the
    top layer and head learn; checkpoints hold those alone; an interrupted warm-up resumes to the same AUC."""
    from transformers import AutoModel
    from rlhb_cli.models.load import minilm_path
    from rlhb_cli.models.discriminator import Discriminator
    args = ["--backbone", "minilm", "--train-top-layers", 1, "--epochs", 1, "--max-train-rows", 160, "--max-length", 64,
            "--checkpoint-every", 4]
    resumed, straight, other = warmup_stopped_and_straight(run, cli, args, stop_after=5)
    assert resumed["val_auc"] == pytest.approx(straight["val_auc"], abs=1e-6)
    assert straight["trained_top_layers"] == 1 and straight["parameters_trained"] < straight["parameters"] / 5
    learning = ("bert.encoder.layer.5.", "bert.pooler.", "classifier.")
    kept = torch.load(run / "warmup-discriminator" / "checkpoint.pt", weights_only=False)["model"]
    assert kept and all(k.startswith(learning) for k in kept)

    disc = Discriminator.load(run / "warmup-discriminator" / "model")  # reloaded for RL: still frozen below
    assert {n for n, p in disc.judge.model.named_parameters() if p.requires_grad} == set(kept)
    pretrained = AutoModel.from_pretrained(minilm_path()).state_dict()
    body = disc.judge.model.base_model.state_dict()
    below = [k for k in pretrained if not k.startswith(("encoder.layer.5.", "pooler."))]
    assert below and all(torch.equal(body[k], pretrained[k]) for k in below)
    assert not torch.equal(body["encoder.layer.5.output.dense.weight"], pretrained["encoder.layer.5.output.dense.weight"])

    # RLGAF's fresh head keeps the warmed-up body's split: its updates and checkpoints touch the same weights.
    cli("train-rlhb", "--run-dir", run, "--no-behavior", "--iterations", 1, "--prompts-per-iteration", 4,
        "--rollouts", 1, "--minibatch-size", 4, "--max-new-tokens", 6, "--source-warmup-rounds", 1,
        "--disc-batch-size", 8, "--sample-every", 0)
    source = torch.load(run / "train-rlgaf" / "checkpoint.pt", weights_only=False)["source"]["model"]
    assert source and all(k.startswith(learning) for k in source)

    # The same for the classifier, on the SFT policy's (Llama) body: its embeddings stay the policy's.
    from transformers import AutoModelForCausalLM
    from rlhb_cli.models.classifier import BehaviorClassifier
    cli("train-classifier", "--run-dir", run, "--train-top-layers", 1, "--epochs", 1, "--max-train-rows", 200)
    summary = summary_of(run, "train-classifier")
    assert summary["trained_top_layers"] == 1 and 0 < summary["parameters_trained"] < summary["parameters"]
    classifier = BehaviorClassifier.load(run / "train-classifier" / "model").judge.model
    policy = AutoModelForCausalLM.from_pretrained(run / "train-sft" / "policy")
    assert torch.equal(classifier.get_input_embeddings().weight, policy.get_input_embeddings().weight)
    assert not classifier.get_input_embeddings().weight.requires_grad

    for bad, message in ((["--freeze-backbone"], "exclude each other"), (["--train-top-layers", 7], "it has 6 layers")):
        refused = cli("warmup-discriminator", "--run-dir", other, "--backbone", "minilm", "--train-top-layers", 1,
                      *bad, ok=False)
        last = refused.output.strip().splitlines()[-1]  # (transformers' load report may log above it)
        assert last.startswith("error: ") and message in last


def test_a_judge_with_its_own_tokenizer_scores_the_policys_text(run, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rlhb_cli.models.judge import Judge
    from rlhb_cli.prompts import generator_prompt
    from rlhb_cli.models.discriminator import Discriminator
    cli("warmup-discriminator", "--run-dir", run, "--backbone", "tiny", "--epochs", 1, "--max-train-rows", 300)
    judge = Judge.load(run / "warmup-discriminator" / "model")
    discriminator = Discriminator(judge)
    policy_dir = run / "train-sft" / "policy"
    policy_tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    assert judge.tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    prompt = generator_prompt("Hi there!", "viewed by many")
    ids = policy_tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    out = policy.generate(**ids, max_new_tokens=12, do_sample=True, pad_token_id=policy_tokenizer.pad_token_id)
    response = policy_tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    behavior = json.loads((run / "prepare-behaviors" / "behavior.json").read_text())["most_preferred_text"]
    score = discriminator.probability(["Hi there!"], [response], [behavior])
    assert score.shape == (1,) and torch.isfinite(score).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_judges_stored_token_ids_make_the_tokenizers_own_batch(sft_run, padding_side, monkeypatch):
    from transformers import AutoTokenizer
    from rlhb_cli.models import judge as judge_module
    from rlhb_cli.models.load import minilm_path
    monkeypatch.setattr(judge_module, "TOKEN_STORE_SIZE", 8)  # the store overflows and halves on the way
    texts = ["How do I sort a list?  Use sorted().", "a", "word " * 300, "Déjà vu, naïve café?"]
    for tokenizer_dir in (minilm_path(), sft_run / "train-sft" / "policy"):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.padding_side = padding_side
        judge = judge_module.Judge(None, tokenizer, judge_module.JudgeMeta("discriminator", 64, True))
        for batch in (texts, texts[1:] + texts[:2], [f"text {i}" for i in range(10)] + texts[:1], texts[2:3]):
            expected = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
            got = judge.encode(batch)
            for key in ("input_ids", "attention_mask"):
                assert torch.equal(got[key], expected[key]), (tokenizer_dir, key)
            assert len(judge._token_ids) <= 8 + len(set(batch))


def test_classifier_beats_majority_and_resume_matches(run, cli):
    from rlhb_cli.models.classifier import BehaviorClassifier
    args = ["--epochs", 3, "--max-train-rows", 1500, "--learning-rate", 3e-3, "--checkpoint-every", 20]
    other = run.parent / "straight"
    shutil.copytree(run, other)
    cli("train-classifier", "--run-dir", run, *args, "--stop-after-steps", 33)
    assert json.loads((run / "train-classifier" / "manifest.json").read_text())["status"] == "stopped"
    refused = cli("status", "--run-dir", run).output
    assert "stopped" in refused
    cli("train-classifier", "--run-dir", run, *args, "--resume")
    cli("train-classifier", "--run-dir", other, *args)
    resumed, straight = summary_of(run, "train-classifier"), summary_of(other, "train-classifier")
    assert resumed["heads"] == straight["heads"]
    assert read_jsonl(run / "train-classifier" / "metrics.jsonl") == read_jsonl(other / "train-classifier" / "metrics.jsonl")
    assert sum(h["accuracy"] > h["majority_accuracy"] for h in straight["heads"].values()) >= 3
    classifier = BehaviorClassifier.load(run / "train-classifier" / "model")
    expected = classifier.expected_behavior(["Hi there!"], ["Hello, nice to meet you!"])
    assert set(expected) == {"pv", "clicks", "likes", "dislikes", "shaped_reward"}
    assert expected["likes"][0] <= expected["pv"][0] and -1 <= expected["shaped_reward"][0] <= 1


def test_reward_model_learns_the_annotators(run, cli):
    cli("train-reward", "--run-dir", run, "--epochs", 3, "--learning-rate", 1e-3)
    summary = summary_of(run, "train-reward")
    assert summary["train_pairwise_accuracy"] > 0.6 and summary["val_pairwise_accuracy"] > 0.55
    # every pair is trained on, held out for validation, or about a sealed test query (left out, in the ledger)
    assert summary["pairs_train"] + summary["pairs_validation"] + summary["pairs_sealed"] == summary["pairs_in"] == 480
    assert summary["pairs_sealed"] > 0
    assert 0 < summary["answers_truncated"] < 10  # cut to --max-length and kept (trl would have dropped their pairs)


def test_bad_inputs_of_the_supervised_stages(run, cli, tmp_path):
    # a model path that is not a model
    (tmp_path / "notamodel").mkdir()
    result = cli("train-sft", "--run-dir", run, "--model", tmp_path / "notamodel", "--force", ok=False)
    assert result.exit_code == 2 and "not a Hugging Face model (no config.json)" in result.output
    # a tokenizer without a pad token gets one, and the summary says so
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = run / "train-sft" / "policy"
    nopad = tmp_path / "nopad"
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    model.save_pretrained(nopad)
    tokenizer.save_pretrained(nopad)
    cli("train-sft", "--run-dir", run, "--model", nopad, "--epochs", 0.2, "--max-train-rows", 64, "--force")
    assert any("no pad token" in n for n in summary_of(run, "train-sft")["notes"])
    # bad pair lines are rejected with their line; too many fail the stage
    pairs = tmp_path / "pairs.jsonl"
    good = [{"prompt": f"p{i}", "chosen": "a good answer", "rejected": "a bad answer"} for i in range(60)]
    write_jsonl(pairs, good)
    pairs.write_text(pairs.read_text() + '{"prompt": "x", "chosen": "same", "rejected": "same"}\nnot json\n')
    cli("train-reward", "--run-dir", run, "--pairs", pairs, "--backbone", "tiny", "--epochs", 1,
        "--max-reject-ratio", 0.5)
    rejected = read_jsonl(run / "train-reward" / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(61, "chosen and rejected are the same text"),
                                                            (62, "not valid JSON (Expecting value)")]
    result = cli("train-reward", "--run-dir", run, "--pairs", pairs, "--max-reject-ratio", 0.01, "--force", ok=False)
    assert "2 of 62 lines are bad" in result.output


def test_too_little_data_and_single_class_heads_are_refused(cli, tmp_path):
    rows = [{"query": f"q{i % 3}", "response": f"r{i}", "pv": 10, "clicks": i % 4, "likes": i % 5, "dislikes": 1}
            for i in range(40)]
    logs = write_jsonl(tmp_path / "logs.jsonl", rows)
    run_dir = tmp_path / "run"
    cli("prepare-behaviors", logs, "--run-dir", run_dir, "--validation-fraction", 0.34, "--test-fraction", 0)
    result = cli("train-classifier", "--run-dir", run_dir, "--backbone", "tiny", ok=False)
    assert "head 'pv' has a single class" in result.output and "--heads clicks,likes,dislikes" in result.output
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "small", "--validation-fraction", 0, "--test-fraction", 0)
    result = cli("warmup-discriminator", "--run-dir", tmp_path / "small", "--backbone", "tiny", ok=False)
    assert "the validation split has 0 rows" in result.output
    result = cli("train-classifier", "--run-dir", tmp_path / "nothing", ok=False)
    assert "run `rlhb prepare-behaviors LOGS --run-dir" in result.output


def test_a_run_whose_warmup_is_exactly_one_step_trains(run, cli):
    # 300 rows / 32 = 10 steps at a warm-up share of 0.1: OneCycleLR alone divides by zero here
    cli("train-classifier", "--run-dir", run, "--backbone", "tiny", "--epochs", 1, "--max-train-rows", 300,
        "--warmup-fraction", 0.1)
    assert summary_of(run, "train-classifier")["heads"]


MICRO_BATCHED = [  # (stage, options with a batch of 16 that splits into passes of 4)
    ("train-sft", ["--epochs", 1, "--max-train-rows", 160, "--batch-size", 16, *TINY]),
    ("warmup-discriminator", ["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 160, "--batch-size", 16,
                              "--likelihood-weight", 0]),  # with it, a mean over each pass's real rows
    ("train-classifier", ["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 160, "--batch-size", 16]),
    ("train-reward", ["--backbone", "tiny", "--epochs", 1, "--batch-size", 16]),
]


def test_micro_batches_of_the_supervised_stages_make_the_same_steps(sft_run, tmp_path, cli):
    """Each stage's batch of 16 in passes of 4 whose gradients add up: the same losses and learning rates as
    one pass, up to float rounding; a pass that does not divide the batch is refused in one line."""
    one, micro = tmp_path / "one", tmp_path / "micro"
    shutil.copytree(sft_run, one)
    shutil.copytree(sft_run, micro)
    for stage, options in MICRO_BATCHED:
        cli(stage, "--run-dir", one, *options, "--force")
        cli(stage, "--run-dir", micro, *options, "--micro-batch-size", 4, "--force")
        rows = [read_jsonl(run / stage / "metrics.jsonl") for run in (one, micro)]
        assert len(rows[0]) == len(rows[1]) > 1, stage
        for a, b in zip(*rows):
            assert a.keys() == b.keys(), stage
            for key, value in a.items():
                # Trainer counts a fractional epoch by passes (a last short step is half a step there)
                if key != "epoch" and isinstance(value, float) and not any(
                        word in key for word in ("time", "runtime", "per_second")):
                    assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (stage, key)
        losses = [[r.get("loss/train") for r in stage_rows] for stage_rows in rows]
        assert losses[0] != losses[1], f"{stage}: the same bits in one pass and in four: were there four?"
    for stage, options in MICRO_BATCHED:
        result = cli(stage, "--run-dir", micro, *options, "--micro-batch-size", 5, "--force", ok=False)
        assert result.exit_code != 0 and "Traceback" not in result.output, stage
        assert "error: --micro-batch-size 5 must divide --batch-size 16" in result.output, stage
    assert json.loads((micro / "train-sft" / "manifest.json").read_text())["status"] == "done"  # refused first
