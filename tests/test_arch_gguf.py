"""GGUF import of the qwen2, qwen3, llama (Llama 3) and gemma3 architectures (issue 21).

Each tiny model is written as llama.cpp's convert_hf_to_gguf.py writes it (its conventions kept
in this file's own words: llama q/k rows permuted, Gemma norms stored as 1 + w, Llama 3.1's RoPE
scaling as a rope_freqs tensor of divisors, SentencePiece vocabularies with scores) and must
load as the same model as its HF directory: same config, same tensors, same logits.
"""
import numpy as np
import pytest

from engine.io.checkpoint import load_checkpoint
from engine.io.config import ModelConfig
from engine.io.layout import ModelWeights, WeightsError
from engine.io.tokenizer import spm_merges, tokenizer_from_gguf
from engine.model import Model
from test_arch import PROMPT, as_multipliers, hf_config, hf_tensors
from tiny_model import llama_cpp_permute, tiny_vocab

gguf = pytest.importorskip("gguf")

ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "llama3": "llama", "gemma3": "gemma3"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm"}


def gguf_name(name: str, gemma: bool) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, i, rest = name.split(".", 3)
    stem, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{(_GEMMA_LAYER if gemma else _LAYER)[stem]}.{kind}"


def spm_vocab():
    """A tiny SentencePiece vocabulary in Gemma's shape: control tokens, byte pieces, "▁" pieces
    with descending scores, a user-defined newline run."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n\n"]
    types = [3, 3, 3, 2, 3, 3, 4]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = list("abcdefghijklmnopqrstuvwxyz.,!?0123456789\n") + ["▁"]
    words = ["▁t", "he", "▁the", "in", "▁a", "er", "▁c", "at", "▁cat", "▁s", "on", "▁on", "an", "▁m",
             "▁mat", "re", "▁th", "ing", "▁in", "ca", "▁sat", "▁sa"]
    pieces += chars + words
    types += [1] * (len(chars) + len(words))
    scores = [0.0] * (7 + 256) + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(words))]
    return pieces, types, scores


def write_gguf(path, family: str, config: ModelConfig, hf: dict):
    """`hf`: the HF-stored tensors (Gemma norms as w); written as llama.cpp would."""
    arch = ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    c = config
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    if family == "gemma3":
        w.add_sliding_window(c.sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 3)    # our tiny model: 2 local, 1 global
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_factor)
        pieces, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
        w.add_add_bos_token(True)
        w.add_unk_token_id(3)
    else:
        tokens, types, merges = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if family.startswith("qwen") else "llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if family == "llama3":          # LlamaModel.generate_extra_tensors: divisors of the frequencies
        factors = []
        inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        low_wl = c.rope_original_max_position / c.rope_low_freq_factor
        high_wl = c.rope_original_max_position / c.rope_high_freq_factor
        for freq in inv:
            wl = 2 * np.pi / freq
            if wl < high_wl:
                factors.append(1.0)
            elif wl > low_wl:
                factors.append(c.rope_factor)
            else:
                smooth = (c.rope_original_max_position / wl - c.rope_low_freq_factor) / (
                    c.rope_high_freq_factor - c.rope_low_freq_factor)
                factors.append(1 / ((1 - smooth) / c.rope_factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    for name, a in hf.items():
        if family == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1.0)                       # Gemma3Model: norm_shift
        if family == "llama3" and name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif family == "llama3" and name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        w.add_tensor(gguf_name(name, family == "gemma3"), np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(ARCH))
def test_gguf_loads_as_its_hf_model(tmp_path, family):
    kw = {"use_sliding_window": False} if family.startswith("qwen") else {}
    if family == "qwen3":
        kw["attention_bias"] = True
    config = ModelConfig.from_hf(hf_config(family, **kw))
    if family == "gemma3":      # the SPM vocabulary; llama.cpp scales attention by 1/√head_dim (not the 27B)
        config = ModelConfig.from_hf(hf_config(family, vocab_size=len(spm_vocab()[0]), bos_token_id=2,
                                               eos_token_id=1, query_pre_attn_scalar=16))
    hf = hf_tensors(config, seed=8)
    p = tmp_path / f"{family}.gguf"
    write_gguf(p, family, config, hf)
    ck = load_checkpoint(p)
    assert ck.config == config
    if family == "llama3":                 # its magic, not its name, makes a file a GGUF
        renamed = tmp_path / "weights.safetensors"
        renamed.write_bytes(p.read_bytes())
        assert load_checkpoint(renamed).config == config
    want = as_multipliers(config, hf)
    assert set(ck.tensors) == set(want)
    for n, a in want.items():
        np.testing.assert_array_equal(ck.tensors[n], a, err_msg=n)
    got = Model(ModelWeights.from_hf(ck.config, ck.tensors)).forward(PROMPT[PROMPT < config.vocab_size])
    assert np.isfinite(got).all()
    # the tokenizer is there and round-trips text
    text = "the cat sat on the mat.\n\nthe end"
    assert ck.tokenizer.decode(ck.tokenizer.encode(text, add_special_tokens=False).ids) == text
    if family == "gemma3":
        assert ck.tokenizer.encode("the cat").ids[0] == 2                     # add_bos_token
        assert ck.tokenizer.encode("the cat", add_special_tokens=False).ids[0] != 2
        assert "<start_of_turn>model" in ck.chat_template                     # the built-in Gemma 3 template
    else:
        assert ck.chat_template is None


def test_gguf_foreign_rope_freqs_and_moe_are_refused(tmp_path):
    config = ModelConfig.from_hf(hf_config("llama3"))
    hf = hf_tensors(config)
    p = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(3)
    w.add_uint32("llama.expert_count", 8)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="mixture-of-experts.*expert_count"):
        load_checkpoint(p)
    # a rope_freqs tensor that no llama3 rule produces
    p = tmp_path / "l3.gguf"
    write_gguf(p, "llama3", config, hf)
    r = gguf.GGUFReader(p, "r+")
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    t.data[:] = np.array([1.0, 3.0, 2.0, 5.0], np.float32)
    del r
    with pytest.raises(WeightsError, match="rope_freqs.*not supported"):
        load_checkpoint(p)


def spm_greedy(pieces, scores, text):
    """llama.cpp's SPM tokenizer in plain words: spaces -> "▁", one symbol a character (unknown ones
    as <0xXX> bytes), then repeatedly merge the adjacent pair whose concatenation is a piece with
    the highest score (leftmost first)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    syms = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            m = syms[i] + syms[i + 1]
            if m in vocab and (best is None or scores[vocab[m]] > scores[vocab[best[1]]]):
                best = (i, m)
        if best is None:
            break
        syms[best[0]:best[0] + 2] = [best[1]]
    out = []
    for s in syms:
        out += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return out


def test_spm_tokenizer_merges_by_score_like_llama_cpp():
    pieces, types, scores = spm_vocab()
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
              "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.unknown_token_id": 3}
    tok = tokenizer_from_gguf(fields)
    rng = np.random.default_rng(0)
    alphabet = list("thecasmonirg ") + ["é", "Z"]
    texts = ["the cat sat on the mat", "thecat  sat", "in the", "tthe", "é the Z"]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(1, 20)))) for _ in range(200)]
    for text in texts:
        assert tok.encode(text).ids == spm_greedy(pieces, scores, text), text
        assert tok.decode(tok.encode(text).ids) == text
    # control tokens stay whole, the user-defined newline run is matched first
    assert tok.encode("<start_of_turn>the\n\n").ids == [4, pieces.index("t"), pieces.index("he"), 6]
    assert ["a", "b"] in spm_merges(["a", "b", "ab"], [0.0, 0.0, -1.0])
