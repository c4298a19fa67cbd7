"""`mpm serve`: an OpenAI-compatible server for chat (an MPM or LLaVA checkpoint) and painting (an MPMPaintPipeline).

protocol.py   the request bodies checked into jobs; errors name the field (OpenAI's error schema)
engine.py     one worker thread owning the models: requests batched within a short window, streamed step by step
              (mpm.decoding), a bounded queue, cancellation
app.py        the FastAPI routes (/v1/chat/completions, /v1/images/generations, /v1/models, /health)
server.py     loading the models and running uvicorn (graceful shutdown: running requests are answered)
"""
