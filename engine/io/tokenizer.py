"""Tokenizers and chat templates, from a Hugging Face directory or a GGUF file.

A GGUF file stores the vocabulary as plain lists (tokenizer.ggml.tokens, .merges,
.token_type, .scores); `tokenizer_from_gguf` rebuilds the `tokenizers.Tokenizer` that
the model's tokenizer.json describes, so both sources encode identically. Two kinds:
byte-level BPE ("gpt2" in GGUF terms: SmolLM2, Llama 3, Qwen2/2.5/3), with the
pre-tokenizers of the llama.cpp `tokenizer.ggml.pre` names we can reproduce faithfully;
and SentencePiece BPE ("llama": Gemma 3, Llama 2), rebuilt as transformers' SpmConverter
does (merges from the piece scores, byte fallback, "▁" for spaces). When the GGUF says
add_bos_token, encode() with add_special_tokens (the default) puts BOS first, as the
model's tokenizer.json does; encode(..., add_special_tokens=False) never adds it (chat
templates write their own).

Chat templates are Jinja, rendered the way transformers' apply_chat_template does:
a sandboxed environment with trim_blocks/lstrip_blocks, `raise_exception`, a
`tojson` that keeps non-ASCII text, and `strftime_now`.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..util.files import PathError, input_path

# llama.cpp token types (gguf.TokenType): only these two matter for rebuilding the tokenizer.
TOKEN_TYPE_CONTROL = 3        # special tokens: <|im_start|>, <|endoftext|>, ...
TOKEN_TYPE_USER_DEFINED = 4   # added tokens that are matched verbatim but are not special

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# Llama 3's pre-tokenizer regex (tokenizer.json of Meta-Llama-3 / llama.cpp "llama-bpe").
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the HF pre-tokenizer that splits text the same way, and ignore_merges.
_PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {
    # GPT-2's regex alone.
    "default": (_BYTE_LEVEL, False),
    "gpt-2": (_BYTE_LEVEL, False),
    # SmolLM / StarCoder: every digit is its own pre-token, then GPT-2's regex.
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}, True),
    # Qwen2 / 2.5 / 3: Llama 3's regex with single digits (tokenizer.json of Qwen2.5, NFC first).
    "qwen2": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")},
         "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}, False),
}
_NORMALIZERS = {"qwen2": {"type": "NFC"}}         # tokenizer.ggml.pre -> normalizer (default none)
SPM_SPACE = "\u2581"                               # "▁": SentencePiece's space


class TokenizerError(ValueError):
    """A tokenizer or chat template that cannot be built or rendered."""


def gguf_value(field: Any) -> Any:
    """The Python value of a gguf ReaderField (str, int, float, bool or a list of them).

    Plain values pass through, so callers (and tests) may hand in ordinary dicts.
    """
    if not hasattr(field, "parts") or not hasattr(field, "types"):
        return field
    import gguf  # noqa: PLC0415

    if not field.types:
        return None
    to_str = lambda p: bytes(p).decode("utf-8")   # noqa: E731
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [to_str(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return to_str(field.parts[-1])
    return field.parts[-1].tolist()[0]


def _get(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return gguf_value(fields[key]) if key in fields else default


def _types_and_vocab(fields: Mapping[str, Any], tokens: list) -> tuple[list, dict]:
    """The GGUF's token types (default: all normal) and token -> id, checked against the tokens."""
    types = _get(fields, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{len(tokens)} tokens but {len(types)} token types")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("the vocabulary holds duplicate tokens")
    return types, vocab


def tokenizer_from_gguf(fields: Mapping[str, Any]):
    """Build a tokenizers.Tokenizer from GGUF metadata (GGUFReader.fields or a plain dict).

    Returns None when the file carries no tokenizer. encode() adds no BOS: the chat
    template (or the caller) decides where BOS goes.
    """
    from tokenizers import Tokenizer  # noqa: PLC0415

    model = _get(fields, "tokenizer.ggml.model")
    if model is None:
        return None
    if model == "llama":
        return _spm_tokenizer(fields)
    if model != "gpt2":
        raise TokenizerError(f"tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2' "
                             "and SentencePiece BPE 'llama')")
    pre = _get(fields, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"tokenizer pre-tokenizer {pre!r} is not supported "
                             f"(known: {', '.join(_PRE_TOKENIZERS)})")
    tokens = _get(fields, "tokenizer.ggml.tokens")
    merges = _get(fields, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerError("tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types, vocab = _types_and_vocab(fields, tokens)

    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": tt == TOKEN_TYPE_CONTROL}
             for i, tt in enumerate(types) if tt in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    pre_tok, ignore_merges = _PRE_TOKENIZERS[pre]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _NORMALIZERS.get(pre),
        "pre_tokenizer": pre_tok,
        # ByteLevel post-processing only fixes offsets; BOS where the GGUF asks for it.
        "post_processor": _with_bos(fields, tokens, {"type": "ByteLevel", "add_prefix_space": True,
                                                     "trim_offsets": False, "use_regex": True}),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises its own Exception type on a bad spec
        raise TokenizerError(f"cannot build the tokenizer from the GGUF vocabulary: {e}") from None


def _with_bos(fields: Mapping[str, Any], tokens: list, post: dict | None) -> dict | None:
    """The post-processor `post`, preceded by BOS insertion when tokenizer.ggml.add_bos_token is set."""
    if not _get(fields, "tokenizer.ggml.add_bos_token", False):
        return post
    bos = _get(fields, "tokenizer.ggml.bos_token_id")
    if not isinstance(bos, int) or not 0 <= bos < len(tokens):
        raise TokenizerError(f"add_bos_token is set but bos_token_id {bos!r} is not a token id")
    b = tokens[bos]
    tp = {"type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}}
    return tp if post is None else {"type": "Sequence", "processors": [post, tp]}


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list:
    """BPE merges that make greedy merging by piece score (SentencePiece BPE, llama.cpp's SPM
    tokenizer) a BPE: every split of a piece into two pieces, ranked by the merged piece's score
    (higher first; ties: longer left piece, then longer right, then vocabulary order), as
    transformers' generate_merges does for its Gemma/Llama converters."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, sc in zip(tokens, scores):
        local = [(t[:i], t[i:], sc) for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def _spm_tokenizer(fields: Mapping[str, Any]):
    """SentencePiece BPE (GGUF tokenizer model "llama") as transformers' SpmConverter builds it:
    spaces become "▁" (with a leading one when add_space_prefix), merges from the scores, unknown
    characters fall back to the <0xXX> byte pieces; control pieces are special added tokens and
    user-defined ones (Gemma's runs of newlines) plain added tokens, matched before the BPE."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    tokens = _get(fields, "tokenizer.ggml.tokens")
    scores = _get(fields, "tokenizer.ggml.scores")
    if not tokens or scores is None or len(scores) != len(tokens):
        raise TokenizerError("a SentencePiece vocabulary needs tokenizer.ggml.tokens and one score a token")
    types, vocab = _types_and_vocab(fields, tokens)
    unk = _get(fields, "tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    prefix = _get(fields, "tokenizer.ggml.add_space_prefix", True)
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": tt == TOKEN_TYPE_CONTROL}
             for i, tt in enumerate(types) if tt in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    norm = [{"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}]
    decoder = [{"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
               {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        norm.insert(0, {"type": "Prepend", "prepend": SPM_SPACE})
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": None,
        "post_processor": _with_bos(fields, tokens, None),
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": spm_merges(tokens, scores)},
    }
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises its own Exception type on a bad spec
        raise TokenizerError(f"cannot build the SentencePiece tokenizer from the GGUF vocabulary: {e}") from None


# The chat template of Gemma 3's instruction-tuned models (google/gemma-3-*-it, text turns only):
# GGUF conversions of Gemma 3 often carry none, and without <start_of_turn> framing the model
# cannot chat. Used only for a gemma3 GGUF that has no tokenizer.chat_template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
DEFAULT_CHAT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}   # GGUF architecture -> template


def chat_template_from_gguf(fields: Mapping[str, Any]) -> str | None:
    t = _get(fields, "tokenizer.chat_template")
    if t is None:
        return DEFAULT_CHAT_TEMPLATES.get(_get(fields, "general.architecture"))
    return t


def load_hf_tokenizer(model_dir: str | os.PathLike):
    """(tokenizers.Tokenizer | None, chat template | None) of a Hugging Face model directory.

    The template comes from chat_template.jinja, chat_template.json or tokenizer_config.json
    (the places transformers has used over time), first found wins.
    """
    from tokenizers import Tokenizer  # noqa: PLC0415

    d = Path(model_dir)
    for name in ("tokenizer.json", "chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        p = d / name
        if os.path.lexists(p):        # present: it must be a readable regular file (a FIFO would block)
            try:
                input_path(p, name)
            except PathError as e:
                raise TokenizerError(str(e)) from None
    tok = None
    tok_path = d / "tokenizer.json"
    if tok_path.is_file():
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{tok_path}: cannot load the tokenizer: {e}") from None

    template = None
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja}: cannot read the chat template: {e}") from None
    else:
        for name in ("chat_template.json", "tokenizer_config.json"):
            p = d / name
            if not p.is_file():
                continue
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise TokenizerError(f"{p}: not valid JSON: {e}") from None
            t = doc.get("chat_template") if isinstance(doc, dict) else None
            if isinstance(t, list):   # named templates: [{"name": "default", "template": ...}, ...]
                named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
                t = named.get("default") or next(iter(named.values()), None)
            if isinstance(t, str):
                template = t
                break
    return tok, template


# ----------------------------------------------------------------------------- chat templates

@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2  # noqa: PLC0415
    from jinja2.ext import loopcontrols  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a chat template."""
    import jinja2  # noqa: PLC0415

    if not template:
        raise TokenizerError("this model has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TokenizerError(f"message {i} must be a mapping with a 'role' and a 'content'")
    compiled = _compile_template(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
    except Exception as e:  # noqa: BLE001  (the template is the file's code: 1/0, "a" + 1, ...)
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- helpers

def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`; special-token strings in it (e.g. <|im_start|>) become their ids."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def token_string(tokenizer, token_id: int | None) -> str:
    """The text of one token id ('' when None or unknown): bos_token/eos_token for templates."""
    if token_id is None:
        return ""
    return tokenizer.id_to_token(int(token_id)) or ""
