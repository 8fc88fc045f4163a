"""The offline demo and the tiny LLaVAs it and the tests are built on, all on CPU with no network.

    python -m demo [--quick]          the end-to-end demo (demo/pipeline.py; = llava-sm demo, bash scripts/demo.sh)
    python -m demo.tiny OUT_DIR       a tiny LLaVA artifact built from config (demo/tiny.py)

Importing the package loads nothing heavy.
"""
