"""dgq-serve: an OpenAI-compatible HTTP server (Starlette + Uvicorn) over engine.api's models.

protocol.py validates the OpenAI request bodies (no web framework needed); worker.py runs the
model in one thread (engine/gpu/decode.py SlotBatch: continuous batching on the GPU;
engine/model/generate.py SerialBatch: one request at a time on the CPU) and hands tokens to the
event loop; app.py holds the routes and the server-sent events; server.py starts Uvicorn.
May import engine.api, engine.io, engine.model, engine.gpu and engine.util.
"""
