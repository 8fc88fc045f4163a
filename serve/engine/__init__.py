"""The serving engine: load a model dir, decode images, encode prompts, batch, generate, stream text pieces.

    model.py       load_artifact: weights (the one 4-bit NF4 load), processor, generation defaults -> LoadedModel
    images.py      image bytes from base64 / data: / http(s) / s3:// with the fetch policy (SSRF, size caps), decode
    preshrink.py   the fast image pre-shrink that keeps the saved processor's pad-to-square semantics
    encoding.py    chat template + tokens + pixel values, exactly as the saved processor would produce them
    predictor.py   Predictor: a batch of GenerationRequests -> one outcome each, from one generate call
    accel.py       static KV cache + compiled decode on CUDA
    batching.py    Batcher: concurrent requests gathered into batches on one generation thread
    textstream.py  what of a row's answer may be shown so far (streamed answers)
    types.py       GenerationRequest, GenerationResult, Outcome
    errors.py      ApiError and its stable codes

Any Python program can drive it (the evaluator and the benchmarks do): it imports no web framework and reads no
environment variable; its settings come in as arguments.
"""
