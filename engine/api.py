"""The embedding entry point: load any supported weights file into a runnable model.

    from engine.api import load_model
    lm = load_model("q.safetensors")            # or an HF dir, a GGUF file, None = SmolLM2 default
    logits = lm.model.forward(np.array(lm.tokenizer.encode("Hello").ids))
    outs = lm.generate(["Hello", "The capital of France is"], max_new_tokens=32)   # [Completion]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .gpu.backend import BackendError, resolve_device
from .io.checkpoint import default_model_path, load_checkpoint, model_weights
from .io.config import ModelConfig
from .io.layout import Checkpoint, WeightsError
from .model.generate import GenerationError
from .model.llama import Model
from .util.errors import param_error

PROMPT_FORMS = "a string or a list of token ids"
MAX_BATCH = 64                 # generate()'s max_batch default (None asks for it)
WRAP_IDS = "to send one prompt of token ids, wrap it: generate([ids])"


@dataclass
class LoadedModel:
    model: object                 # engine.model.Model (NumPy), engine.gpu.model.CudaModel or
                                  # engine.parallel.TPModel (tp > 1, simulated on the CPU)
    config: ModelConfig
    tokenizer: object             # tokenizers.Tokenizer
    chat_template: str | None
    source: str
    device: str
    recipe: dict = field(default_factory=dict)   # quantization recipe of a q.safetensors file

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop=None, chat: bool | None = None, kv8: bool = False,
                 max_batch: int | None = MAX_BATCH):
        """Completions for one prompt (a str: one Completion) or a list of them (a list).

        A prompt is text (a str) or token ids (a list or tuple of ints, or anything np.asarray
        makes a 1-D integer array of: an array, a range, a tensor; sent as is): generate("Hi"),
        generate(["Hi", "Bye"]), generate([ids]) — one token-id prompt goes in a list, since a
        list of ints would read as many prompts. chat None: text goes through
        the chat template when the model has one (as dgq-run does); chat=False: raw text;
        chat=True: the template, required (an error for a model without one, and for token-id
        prompts, which are already encoded: pass their text, or leave chat None/False). Each
        sequence ends at an end-of-turn/EOS id, at one of the `stop` strings (cut off), or after
        max_new_tokens. On the GPU the sequences decode as one continuously batched run of up
        to max_batch at a time (None: MAX_BATCH; engine/gpu/decode.py SlotBatch); on the CPU one
        after another.
        Greedy (temperature 0) output is the same either way and equals one prompt at a time.
        Sampling: on the CPU sequence i draws from seed + i (mod 2^63); on the GPU from (seed, i,
        position), i its submission index, whatever slot it runs in. GenerationError (SamplingError for the
        sampling settings) for a bad prompt or setting, before anything runs."""
        from .model.generate import (  # noqa: PLC0415
            Completion, SeqRequest, SerialBatch, TextCollector, check_request, check_seed,
            check_stop_strings, encode_prompt, run_batch, stop_ids)
        single, plist = _prompt_list(prompts)
        stops = check_stop_strings(stop)
        check_seed(seed)                              # before seed + i below
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer))
                                      or max_batch < 1):
            raise param_error(GenerationError, "max_batch", f"must be an integer >= 1 or None, got {max_batch!r}")
        max_batch = MAX_BATCH if max_batch is None else int(max_batch)
        use_chat = bool(self.chat_template) if chat is None else bool(chat)
        if chat is not None and use_chat:
            if not self.chat_template:
                raise GenerationError("chat=True needs a chat template and this model has none; pass chat=False "
                                      "(or None) to send the text as is")
            ids_at = [i for i, p in enumerate(plist) if not isinstance(p, str)]
            if ids_at:
                raise GenerationError(f"chat=True applies the chat template to text, but prompts[{ids_at[0]}] is "
                                      "token ids (already encoded); pass its text, or chat=None/False to send "
                                      "token ids as is")
        ctx = self.config.max_position_embeddings
        sids = frozenset(stop_ids(self.tokenizer, self.config))
        reqs, texts = [], []
        on_gpu = hasattr(self.model, "decode")
        if seed is None:                              # as generate(): a fresh seed
            seed = int(np.random.default_rng().integers(2**62))
        for i, p in enumerate(plist):
            try:
                if isinstance(p, str):
                    ids = encode_prompt(self.tokenizer, p, self.chat_template, use_chat, self.config)
                else:
                    ids = _token_ids(p, self.config.vocab_size)
                col = TextCollector(self.tokenizer, stops)
                req = SeqRequest(ids, max_new_tokens, temperature, top_k, top_p,
                                 seed if on_gpu else (int(seed) + i) % 2**63, sids,
                                 on_token=lambda t, col=col: col.push(t)[1], kv8=kv8)
                check_request(req, ctx)
            except GenerationError as e:      # (max_new_tokens, sampling: check_request; about no one prompt)
                if single or getattr(e, "param", None):
                    raise
                raise GenerationError(f"prompts[{i}]: {e}") from None
            reqs.append(req)
            texts.append(col)
        if on_gpu:
            from .gpu.decode import SlotBatch  # noqa: PLC0415
            cap = min(ctx, max(len(r.prompt_ids) for r in reqs) + int(max_new_tokens))
            batch = SlotBatch(self.model, min(len(reqs), max_batch), cap, kv8=kv8)
        else:
            batch = SerialBatch(self.model)
        run_batch(batch, reqs)
        out = []
        for req, col in zip(reqs, texts):
            col.finish()
            if req.finish_reason == "error":
                raise GenerationError(req.error)
            ids = req.tokens[:-1] if req.tokens and req.tokens[-1] in req.stop_ids else req.tokens
            out.append(Completion(col.text, list(ids), req.finish_reason, len(req.prompt_ids)))
        return out[0] if single else out


def _prompt_list(prompts) -> tuple[bool, list]:
    """(one prompt given alone, the prompts as a list); GenerationError saying what a prompt may be
    and which one is not."""
    if isinstance(prompts, str):
        return True, [prompts]
    if isinstance(prompts, np.ndarray):
        raise GenerationError(f"prompts is a NumPy array; give a list of prompts, each {PROMPT_FORMS}; {WRAP_IDS}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError(f"prompts must be a string or a non-empty list of prompts, each {PROMPT_FORMS}; "
                              f"got {_show(prompts)}")
    for i, p in enumerate(prompts):
        # a scalar, bytes or None cannot be a prompt; any other sequence is token ids if
        # np.asarray makes it a 1-D integer array (range, array.array, a tensor): _token_ids
        if p is None or isinstance(p, (bytes, bytearray, int, float, np.integer, np.floating)):
            hint = f"; {WRAP_IDS}" if isinstance(p, (int, np.integer)) and not isinstance(p, bool) else ""
            raise GenerationError(f"prompts[{i}] is {_show(p)}; each prompt must be {PROMPT_FORMS}{hint}")
    return False, list(prompts)


def _token_ids(p, vocab_size: int) -> list[int]:
    """A token-id prompt (list, tuple or 1-D array of ints) as a list of ints in [0, vocab_size)."""
    if not isinstance(p, (list, tuple)):              # an array, range, array.array, tensor, ...
        try:
            a = np.asarray(p)
        except (TypeError, ValueError) as e:
            raise GenerationError(f"a prompt must be {PROMPT_FORMS}; {_show(p)} is neither ({e})") from None
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise GenerationError(f"token ids must be a 1-D integer array, got {_show(p)} as {a.dtype} of "
                                  f"shape {a.shape}")
        p = a.tolist()                                 # Python ints, checked as a list's are
    if len(p) == 0:
        raise GenerationError("no token ids (an empty list)")
    for j, t in enumerate(p):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise GenerationError(f"token ids must be ints; the one at position {j} is {_show(t)}")
        if not 0 <= t < vocab_size:
            raise GenerationError(f"token id {int(t)} at position {j} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in p]


def _show(x) -> str:
    """A value for an error message: its type and a short repr."""
    r = repr(x)
    return f"{type(x).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def load_weights(path=None):
    """(ModelWeights, tokenizer, chat_template, source, recipe) from a path; None = the default model.
    Every refusal of the file is a WeightsError naming it."""
    if path is not None and (isinstance(path, bool) or not isinstance(path, (str, os.PathLike))):
        raise WeightsError(f"path must be a file or directory path (str or os.PathLike) or None, "
                           f"got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():
        raise WeightsError("path is empty; give a weights file or directory, or None for the default model")
    ck = load_checkpoint(default_model_path() if path is None else path)
    recipe = {} if isinstance(ck, Checkpoint) else dict(ck.recipe)
    return model_weights(ck), ck.tokenizer, ck.chat_template, str(ck.source), recipe


LM_HEADS = ("fp16", "int8")


def load_model(path=None, device: str = "cpu", lm_head: str = "fp16", kernel_choice: str | None = None,
               objective: str | None = None, tp: int = 1) -> LoadedModel:
    """Load weights and build the NumPy or GPU model. lm_head "int8": the output head as
    symmetric INT8 with one scale per vocabulary row (ModelWeights.with_int8_lm_head), on
    both paths; "fp16" (default) keeps it as the file has it. kernel_choice ("table" |
    "learned" | "exhaustive") and objective ("time" | "energy") set how the GPU engine picks
    each A8W4 GEMM's configuration (engine/gpu/choice.py); None keeps DGQ_KERNEL_CHOICE /
    DGQ_OBJECTIVE (default: learned when the GPU's model file exists, else the table).
    tp > 1: the model split over tp ranks (engine/parallel, docs/PARALLEL.md); only the CPU
    simulation of the sharded model is built (device "cpu"), the multi-GPU run is not yet."""
    if not isinstance(lm_head, str) or lm_head not in LM_HEADS:
        raise BackendError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise BackendError(f"tp must be a whole number of ranks (1 or more), got {tp!r}")
    asked = device
    device = resolve_device(device)
    if tp > 1 and device == "cuda":
        raise BackendError(f"tp={tp}: tensor parallelism over several GPUs is not built yet; with device 'cpu' "
                           "the sharded model runs as a CPU simulation (docs/PARALLEL.md)")
    mw, tok, tmpl, source, recipe = load_weights(path)
    if lm_head == "int8":
        mw = mw.with_int8_lm_head()
    model = None
    if device == "cuda":
        from .gpu import choice  # noqa: PLC0415
        from .gpu.model import CudaModel  # noqa: PLC0415  (the GPU package loads only when asked for)
        from .gpu.ops import CudaOpError  # noqa: PLC0415
        if kernel_choice is not None or objective is not None:
            choice.configure(kernel_choice, objective)      # ChoiceError (a ValueError) names the choices
        try:
            model = CudaModel(mw)
        except (BackendError, CudaOpError) as e:
            if asked == "cuda":
                raise
            # --device auto: a file the GPU engine cannot run (e.g. a simulated baseline) runs on the CPU
            print(f"note: running on the CPU: {e}", file=sys.stderr)
            device = "cpu"
    if model is None and tp > 1:
        from .parallel.sim import TPModel  # noqa: PLC0415
        model = TPModel(mw, tp)            # ModelError naming what cannot be split that way
    if model is None:
        model = Model(mw)
    return LoadedModel(model, mw.config, tok, tmpl, source, device, recipe)
