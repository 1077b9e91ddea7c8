"""kvembed's benchmarks, importable from an installed package (`python -m kvembed.bench.<name>`, `kvembed bench`).

    attention     the prefix-attention routine against plain causal SDPA (the floor), rotated and unrotated
    forward       the whole embedding forward: re-routing vs plain, vs transformers (one text, a padded batch),
                  and the share of the measured matmul peak it reaches
    memory        peak memory of one long text, each length in a fresh process
    baselines     MetaEOL with each prompt's instruction run once, against every row running it
    scale         embed-corpus, one process vs torchrun
    device_check  the GPU run: the three above on random weights shaped like three real models, bf16
    report        regenerates perf.md (targets and verdicts) from the results files

Every script has `main(argv=None) -> int`, prints JSON lines, writes `<out>/<script>.json` (default
`./bench/results`, relative to the current directory) and regenerates `<out>/perf.md`. Nothing is ever written
inside the installed package. Shared plumbing: `common` (devices, paired timing, kernels, records) and
`models` (real shapes, random weights, transformers twins, the padded text batch).
"""
