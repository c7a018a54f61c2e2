"""The embedding entry point: load any supported weights file into a runnable model.

    from engine.api import load_model
    lm = load_model("q.safetensors")            # or an HF dir, a GGUF file, None = SmolLM2 default
    logits = lm.model.forward(np.array(lm.tokenizer.encode("Hello").ids))
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .gpu.backend import BackendError, resolve_device
from .io.checkpoint import default_model_path, load_checkpoint
from .io.config import ModelConfig
from .io.layout import Checkpoint, ModelWeights, WeightsError
from .model.llama import Model


@dataclass
class LoadedModel:
    model: object                 # engine.model.Model (NumPy) or engine.gpu.model.CudaModel
    config: ModelConfig
    tokenizer: object             # tokenizers.Tokenizer
    chat_template: str | None
    source: str
    device: str
    recipe: dict = field(default_factory=dict)   # quantization recipe of a q.safetensors file


def load_weights(path=None):
    """(ModelWeights, tokenizer, chat_template, source, recipe) from a path; None = the default model.
    Every refusal of the file is a WeightsError naming it."""
    if path is not None and (isinstance(path, bool) or not isinstance(path, (str, os.PathLike))):
        raise WeightsError(f"path must be a file or directory path (str or os.PathLike) or None, "
                           f"got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():
        raise WeightsError("path is empty; give a weights file or directory, or None for the default model")
    ck = load_checkpoint(default_model_path() if path is None else path)
    if isinstance(ck, Checkpoint):
        mw = ModelWeights.from_hf(ck.config, ck.tensors)
        return mw, ck.tokenizer, ck.chat_template, str(ck.source), {}
    # a quantized file: engine.io.qfile returns the weights already assembled
    return ck.weights, ck.tokenizer, ck.chat_template, str(ck.source), dict(ck.recipe)


LM_HEADS = ("fp16", "int8")


def load_model(path=None, device: str = "cpu", lm_head: str = "fp16", kernel_choice: str | None = None,
               objective: str | None = None) -> LoadedModel:
    """Load weights and build the NumPy or GPU model. lm_head "int8": the output head as
    symmetric INT8 with one scale per vocabulary row (ModelWeights.with_int8_lm_head), on
    both paths; "fp16" (default) keeps it as the file has it. kernel_choice ("table" |
    "learned" | "exhaustive") and objective ("time" | "energy") set how the GPU engine picks
    each A8W4 GEMM's configuration (engine/gpu/choice.py); None keeps DGQ_KERNEL_CHOICE /
    DGQ_OBJECTIVE (default: learned when the GPU's model file exists, else the table)."""
    if not isinstance(lm_head, str) or lm_head not in LM_HEADS:
        raise BackendError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    asked = device
    device = resolve_device(device)
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
    if model is None:
        model = Model(mw)
    return LoadedModel(model, mw.config, tok, tmpl, source, device, recipe)
