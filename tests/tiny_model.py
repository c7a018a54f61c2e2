"""A tiny random Llama checkpoint for fast tests: HF directory and llama.cpp-style GGUF writers.

The HF directory is written with the safetensors package's own NumPy writer for
fp32/fp16, so loading it checks our reader against an independent writer. NumPy
cannot express bfloat16, so bf16 files go through engine.io.safetensors.write_safetensors
(whose rounding tests/test_weights.py checks against llama.cpp's gguf implementation).

The tokenizer is a byte-level BPE in SmolLM2's shape: three special tokens at ids
0..2, the 128 ASCII bytes as byte-level symbols (so any ASCII text encodes), and a
handful of merges; the vocabulary is therefore 144, not a power of two.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.io.config import ModelConfig
from engine.io.layout import Checkpoint, expected_shapes
from engine.io.safetensors import round_to_dtype, write_safetensors

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
               ("Ġ", "s"), ("r", "e"), ("a", "t"), ("Ġ", "c"), ("e", "n"), ("o", "r")]
TINY_VOCAB = len(TINY_SPECIALS) + 128 + len(TINY_MERGES)     # 144
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, llama.cpp token types, merges as 'a b' strings)."""
    b2u = bytes_to_unicode()
    tokens = TINY_SPECIALS + [b2u[b] for b in range(128)] + [a + b for a, b in TINY_MERGES]
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in TINY_MERGES]


def make_tiny_tokenizer():
    """A tokenizers.Tokenizer like SmolLM2's (digits split, then byte-level BPE), tiny vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, _, _ = tiny_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(TINY_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    return tok


def make_tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return ModelConfig(**base)


def make_tiny_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names: N(0, 0.1) linears, norms near 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def make_tiny_checkpoint(out_dir, dtype: str = "float32", shards: int = 1, tie: bool = False,
                         seed: int = 0, **config_overrides) -> Checkpoint:
    """Write a random tiny HF directory; return the Checkpoint of the exact float32 values stored."""
    from safetensors.numpy import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    config = make_tiny_config(tie_word_embeddings=tie, **config_overrides)
    tensors = {n: round_to_dtype(a, dtype) for n, a in make_tiny_tensors(config, seed).items()}

    cfg = config.to_hf()
    cfg["torch_dtype"] = dtype
    (d / "config.json").write_text(json.dumps(cfg, indent=2))

    names = list(tensors)
    groups = [list(g) for g in np.array_split(np.array(names, dtype=object), shards) if len(g)]
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for fname, group in zip(files, groups):
        part = {n: tensors[n] for n in group}
        if dtype == "bfloat16":
            write_safetensors(d / fname, part, {"format": "pt"}, float_dtype="bfloat16")
        else:
            save_file({n: a.astype(dtype) for n, a in part.items()}, str(d / fname), {"format": "pt"})
    if len(groups) > 1:
        wmap = {n: f for f, g in zip(files, groups) for n in g}
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}, indent=2))

    tok = make_tiny_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "chat_template": TINY_CHAT_TEMPLATE}, indent=2))
    return Checkpoint(config, tensors, tok, TINY_CHAT_TEMPLATE, str(d))


# HF name pieces -> llama.cpp names (the inverse of engine.io.gguf_file.gguf_to_hf_name).
_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def hf_to_gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, i, rest = name.split(".", 3)               # model.layers.{i}.{rest}.weight
    return f"blk.{i}.{_HF_TO_GGUF_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def write_tiny_gguf(path, ckpt: Checkpoint, arch: str = "llama", qtypes: dict[str, object] | None = None
                    ) -> dict[str, np.ndarray]:
    """Write `ckpt` as llama.cpp's convert_hf_to_gguf.py would (q/k rows permuted).

    qtypes maps a llama.cpp tensor suffix ('ffn_up') to a GGMLQuantizationType to store it
    quantized. Returns the float32 HF tensors a correct loader must give back (the
    dequantized values for quantized tensors).
    """
    import gguf

    c = ckpt.config
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_add_bos_token(False)
    if ckpt.chat_template:
        w.add_chat_template(ckpt.chat_template)

    expect = {}
    for name, a in ckpt.tensors.items():
        gname = hf_to_gguf_name(name)
        qt = qtypes.get(gname.split(".")[-2])
        # Rows are quantized independently, so dequant(quant(.)) commutes with the row permutation.
        expect[name] = a if qt is None else gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        if qt is None:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {n: np.asarray(a, dtype=np.float32) for n, a in expect.items()}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, kept in its own words so the
    loader's inverse is tested against the converter, not against itself."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))
