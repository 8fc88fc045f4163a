"""`python -m datagen OUT_DIR ...`: the synthetic chart-QA generator (datagen/synth.py; = `llava-sm data synth`)."""

from datagen.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
