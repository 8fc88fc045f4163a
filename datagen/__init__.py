"""Synthetic chart-QA data in the LLaVA conversation format: tables -> matplotlib charts -> question-answer pairs.

    python -m datagen OUT_DIR [-n 1000] [--preset default|demo] [--tables my_tables.csv]   (= llava-sm data synth)

synth.py runs a generation (options, split, output files), tables.py makes or reads the tables, charts.py draws
them and chartqa.py asks the questions. Importing the package loads nothing heavy (matplotlib only when drawing).
"""
