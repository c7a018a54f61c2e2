"""The embedding entry point: load any supported weights file into a runnable model.

    from engine.api import load_model
    lm = load_model("q.safetensors")            # or an HF dir, a GGUF file, None = SmolLM2 default
    logits = lm.model.forward(np.array(lm.tokenizer.encode("Hello").ids))
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field

from .backend import BackendError, resolve_device
from .config import ModelConfig
from .model import Model, ModelWeights


@dataclass
class LoadedModel:
    model: object                 # engine.model.Model (NumPy) or the GPU model
    config: ModelConfig
    tokenizer: object             # tokenizers.Tokenizer
    chat_template: str | None
    source: str
    device: str
    recipe: dict = field(default_factory=dict)   # quantization recipe of a q.safetensors file


def load_weights(path=None):
    """(ModelWeights, tokenizer, chat_template, source, recipe) from a path; None = the default model."""
    from . import weights  # noqa: PLC0415  (keeps `import engine.api` light)
    if path is None:
        path = weights.default_model_path()
    ck = weights.load_checkpoint(path)
    if isinstance(ck, weights.Checkpoint):
        mw = ModelWeights.from_hf(ck.config, ck.tensors)
        return mw, ck.tokenizer, ck.chat_template, str(ck.source), {}
    # a quantized file: engine.qfile returns the weights already assembled
    return ck.weights, ck.tokenizer, ck.chat_template, str(ck.source), dict(ck.recipe)


def gpu_engine_available() -> bool:
    import importlib.util  # noqa: PLC0415
    return importlib.util.find_spec("engine.model_cuda") is not None


LM_HEADS = ("fp16", "int8")


def load_model(path=None, device: str = "cpu", lm_head: str = "fp16") -> LoadedModel:
    """Load weights and build the NumPy or GPU model. lm_head "int8": the output head as
    symmetric INT8 with one scale per vocabulary row (ModelWeights.with_int8_lm_head), on
    both paths; "fp16" (default) keeps it as the file has it."""
    if lm_head not in LM_HEADS:
        raise BackendError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    asked = device
    device = resolve_device(device)
    if device == "cuda" and not gpu_engine_available():
        if asked == "cuda":
            raise BackendError("--device cuda: this build has no GPU engine yet; use --device cpu")
        device = "cpu"
    mw, tok, tmpl, source, recipe = load_weights(path)
    if lm_head == "int8":
        mw = mw.with_int8_lm_head()
    model = None
    if device == "cuda":
        from .model_cuda import CudaModel  # noqa: PLC0415
        from .ops_cuda import CudaOpError  # noqa: PLC0415
        try:
            model = CudaModel(mw)
        except (BackendError, CudaOpError) as e:
            if asked == "cuda":
                raise
            # --device auto: a file the GPU engine cannot run (e.g. a simulated baseline) runs on the CPU
            import sys  # noqa: PLC0415
            print(f"note: running on the CPU: {e}", file=sys.stderr)
            device = "cpu"
    if model is None:
        model = Model(mw)
    return LoadedModel(model, mw.config, tok, tmpl, source, device, recipe)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (the CLI and the converter report it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
