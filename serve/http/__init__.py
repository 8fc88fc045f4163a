"""The HTTP layer: FastAPI routes over the engine (serve/engine/), one module per protocol.

    app.py        create_app: the app, its lifespan (model load on a background thread) and shared state
    sagemaker.py  SageMaker's /ping, /invocations and /execution-parameters
    schema.py     the /invocations wire contract (pydantic) and its reply
    openai.py     OpenAI-compatible /v1/chat/completions and /v1/models (also /invocations bodies with "messages")
    openai_schema.py  the chat-completions wire contract: request, refusals, replies, chunks, OpenAI's error shape
    sse.py        server-sent events for streamed answers
    envelope.py   the error envelope and handlers
    requests.py   the body cap and the request-id log middleware

Only this package imports FastAPI/starlette; the engine never imports it.
"""
