"""`python -m demo [--quick] [--workdir DIR] [--lora]`: the offline end-to-end demo (demo/pipeline.py)."""

from demo.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
