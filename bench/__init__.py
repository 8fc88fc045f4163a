"""Benchmarks: scripts that print numbers and write JSON + markdown (docs/benchmarks.md says how to run each).

    python -m bench.preprocess            image decode + pad + resize, reference vs fast path
    python -m bench.load URL              load generator against a running server (concurrency sweep)
    python -m bench.run_cpu               tiny model on CPU: server without vs with batching, then the sweep
    python -m bench.gpu                   LLaVA-1.5-7B-shaped NF4 model on CUDA: decode, batching, TTFT
"""
