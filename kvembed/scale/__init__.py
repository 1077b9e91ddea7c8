"""Building blocks of `kvembed embed-corpus` (driver: kvembed/corpus.py).

inputs.py     the JSONL input: validate, index rows by byte offset, read a row range
parts.py      fixed-size parts: atomic writes, commit records, checksums
manifest.py   run.json (who owns OUTDIR), final assembly, manifest.json, the reader
progress.py   per-rank and whole-run rate and ETA
"""
