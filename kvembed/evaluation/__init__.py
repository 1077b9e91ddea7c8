"""Evaluation on the local data pack with the MTEB 2.x protocol (optional extra: `pip install kvembed[eval]`).

tasks.py        the data pack on disk: task.json, splits, seeded --max-rows subsets, the --max-text-tokens cut
mteb_tasks.py   local tasks as in-memory mteb task objects (mteb computes every score)
mteb_adapter.py KVEmbeddingMTEB: a kvembed embedder as an mteb encoder (query/document prompts)
cache.py        on-disk embedding cache keyed by (fingerprint, prompt, text)
lexical.py      hashed bag-of-words: the model-free floor and test stand-in
runners.py      methods x tasks -> scores, timings, cache counts
ablations.py    the one-switch-at-a-time grid, on validation splits only
report.py       eval.md / eval.json, ablations.md / ablations.json
cli_eval.py     `kvembed eval`
"""
