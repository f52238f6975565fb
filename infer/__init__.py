"""Runnable demos of jspec: `python -m infer.generate` (one AR vs speculative comparison) and
`python -m infer.bench` (every strategy, timed, with the speedup its measured costs predict).

Until trained demo models exist the default models are random-init (`infer.models`); the scripts
say so in everything they print and record.
"""
