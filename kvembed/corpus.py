"""`kvembed embed-corpus INPUT.jsonl OUTDIR`: embed a large corpus with one process or many.

Alone it is one process; under `torchrun --nproc-per-node N` (or several nodes with the usual rendezvous
flags) torch.distributed supplies the rank and world size and a barrier — there is no scheduler here.

    rows       the input's texts, 0..N-1 in file order (kvembed/scale/inputs.py)
    part k     rows [k * P, (k + 1) * P); P = --part-size; defined on the input, never on the ranks
    rank r     computes the parts k with k % world == r that are not already finished on disk

Each part is embedded in length-sorted batches that depend only on the part's own texts, so an embedding
never depends on which rank computed it or how many ranks there are: the output files are identical for
any world size (same hardware, dtype and thread count). After a barrier, rank 0 streams the parts into
one memory-mappable embeddings.npy and commits manifest.json. A rerun skips every finished part; a killed
rank loses at most the part it was writing (see kvembed/scale/parts.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kvembed.cli_options import add_model_options, embedder_from_args, positive_int, switches_from_args
from kvembed.encoder import TruncationWarning
from kvembed.scale.inputs import read_rows, scan_jsonl
from kvembed.scale.manifest import (FORMAT, OutdirError, assemble, check_or_claim, intact, load_corpus_embeddings,
                                   read_manifest, run_key)
from kvembed.scale.parts import finished_record, json_bytes, n_parts, part_range, remove_stale_tmp, write_part
from kvembed.scale.progress import Progress, fmt_seconds, say

__all__ = ["embed_corpus", "load_corpus_embeddings", "add_arguments", "run", "main"]


# ---------------------------------------------------------------------------------------------------
# torch.distributed, only when launched by torchrun with more than one process


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def launch_context(device: str) -> tuple[int, str]:
    """(world, device) from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per local process
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=float(os.environ.get("KVEMBED_DIST_TIMEOUT_MIN", "720")))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return world, device


# ---------------------------------------------------------------------------------------------------
# Embedding one part


def embed_part(embedder, texts: list[str], *, batch_size: int, prompt_name: str,
               on_batch=None) -> tuple[np.ndarray, int]:
    """(float32 (len(texts), dim) in the order of `texts`, number of texts cut to max_length). Batches are cut
    from the part's texts sorted by length (longest first, so an out-of-memory shows at once), ties in input
    order: a pure function of the part, whichever rank runs it. Length is in tokens where the embedder exposes
    a `tokenizers` tokenizer, else in characters: only the sort uses it."""
    tok = getattr(embedder, "tokenizer", None)
    if hasattr(tok, "encode_batch"):
        lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        lengths = [len(t) for t in texts]
    order = np.argsort(-np.array(lengths, dtype=np.int64), kind="stable")
    out, truncated = None, 0
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        with warnings.catch_warnings():
            # One warning per batch would bury the progress lines: cut texts are counted instead.
            warnings.simplefilter("ignore", TruncationWarning)
            emb = embedder.encode([texts[i] for i in idx], prompt_name=prompt_name, batch_size=len(idx),
                                  show_progress_bar=False, convert_to_numpy=True)
        truncated += len(getattr(embedder, "last_truncated", ()))
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(idx):
            raise RuntimeError(f"encoder returned shape {emb.shape} for a batch of {len(idx)} texts")
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb  # back to input order
        if on_batch is not None:
            on_batch(len(idx))
    return out, truncated


# ---------------------------------------------------------------------------------------------------
# The run


def embed_corpus(input_path, outdir, embedder, *, method: dict | None = None, dtype: str = "float32",
                 prompt_name: str = "document", part_size: int = 10000, batch_size: int = 32,
                 id_field: str = "id", text_field: str = "text", skip_bad_lines: bool = False,
                 rank: int | None = None, world_size: int | None = None, finalize: bool | None = None,
                 log_every: float = 10.0, quiet: bool = False, log=None) -> dict:
    """Embed INPUT.jsonl into OUTDIR; resumable; returns the run summary (rank 0: all ranks).

    `embedder` needs `.encode(texts, prompt_name=..., batch_size=..., ...)`, `.fingerprint` and
    `.get_embedding_dimension()` (a KVEmbedder). rank/world_size default to torch.distributed's (or 0/1);
    `finalize` (default: rank 0) assembles embeddings.npy and manifest.json after the barrier.
    `method` is recorded as given (informational: the fingerprint is what must match)."""
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"part_size ({part_size}) and batch_size ({batch_size}) must be >= 1")
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    finalize = rank == 0 if finalize is None else finalize
    out = None if quiet else log if log is not None else sys.stderr
    outdir = Path(outdir)
    t0 = time.monotonic()

    index = scan_jsonl(input_path, id_field=id_field, text_field=text_field, skip_bad=skip_bad_lines)
    n_rows, total_parts = len(index), n_parts(len(index), part_size)
    config = {
        "format": FORMAT,
        "fingerprint": str(embedder.fingerprint),
        "dtype": dtype,
        "prompt_name": prompt_name,
        "method": method or {},
        "input_name": Path(input_path).name,
        "input_sha256": index.sha256,
        "id_field": id_field,
        "text_field": text_field,
        "skip_bad_lines": skip_bad_lines,
        "skipped_lines": index.skipped,
        "rows": n_rows,
        "part_size": part_size,
        "batch_size": batch_size,
        "dim": int(embedder.get_embedding_dimension()),
    }
    if index.duplicates:
        config["duplicate_ids"] = index.duplicates  # informational: rows are positional, every one is kept
        say(out, f"[rank {rank}] warning: {index.duplicates['count']} row(s) repeat an earlier id (first: "
            f"{index.duplicates['examples'][:3]}); every row is embedded and kept in input order, so look rows up "
            "by position, or give unique ids")
    key = run_key(config)
    if outdir.exists() and not outdir.is_dir():
        raise OutdirError(f"{outdir} is a file, not a folder; give embed-corpus a folder for its output")
    outdir.mkdir(parents=True, exist_ok=True)
    # Every rank checks (they all see the same run.json); only rank 0 writes it and sweeps temporary files
    # of killed writers, while the others wait at the barrier and so cannot be writing.
    check_or_claim(outdir, config, write=rank == 0)
    if rank == 0:
        stale = remove_stale_tmp(outdir)
        if stale:
            say(out, f"[rank 0] removed {stale} unfinished temporary file(s) of an interrupted run")
    barrier()
    t_setup = time.monotonic()

    mine = [k for k in range(total_parts) if k % world_size == rank]
    todo = [k for k in mine if finished_record(outdir, k, *part_range(k, part_size, n_rows), key) is None]
    rows_todo = sum(end - start for start, end in (part_range(k, part_size, n_rows) for k in todo))
    seen: dict[int, int] = {}

    def done_on_disk() -> tuple[int, int]:
        for k in range(total_parts):
            if k not in seen and finished_record(outdir, k, *part_range(k, part_size, n_rows), key, verify=False):
                seen[k] = part_range(k, part_size, n_rows)[1] - k * part_size
        return len(seen), sum(seen.values())

    progress = Progress(rank, world_size, rows_todo, total_rows=n_rows, total_parts=total_parts,
                        done_on_disk=done_on_disk if rank == 0 else None, every=log_every, out=out)
    say(out, f"[rank {rank}/{world_size}] {n_rows} rows in {total_parts} parts of {part_size}; mine: {len(mine)}, "
        f"{len(mine) - len(todo)} already finished, {len(todo)} to compute ({rows_todo} rows)")
    for k in todo:
        start, end = part_range(k, part_size, n_rows)
        ids, texts = read_rows(index, start, end)
        matrix, cut = embed_part(embedder, texts, batch_size=batch_size, prompt_name=prompt_name,
                                 on_batch=progress.advance)
        write_part(outdir, k, start, ids, matrix, key, truncated=cut)
    embed_s = time.monotonic() - t_setup
    if todo:
        progress.advance(0, force=True)
    mine_stats = {"rank": rank, "parts_computed": len(todo), "parts_skipped": len(mine) - len(todo),
                  "rows_computed": rows_todo, "embed_seconds": round(embed_s, 3),
                  "texts_per_s": round(rows_todo / embed_s, 2) if embed_s > 0 else 0.0}
    barrier()
    ranks = [mine_stats]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine_stats)
    wall_embed = time.monotonic() - t_setup
    if not finalize:
        return mine_stats

    t_asm = time.monotonic()
    # A rerun that computed nothing over a committed, intact manifest of this run has nothing to assemble; the
    # final files are checked against their recorded sha256 first, so a damaged one is rebuilt from the parts.
    reuse = not any(r["parts_computed"] for r in ranks) and (outdir / "manifest.json").is_file()
    already = reuse and intact(outdir, key)
    if reuse and not already:
        say(out, f"[rank 0] {outdir}: manifest.json is damaged or embeddings.npy or ids.json does not match it; "
            "rebuilding them from the verified parts")
    manifest = read_manifest(outdir) if already else assemble(outdir, config, n_rows)
    totals = {f: sum(r[f] for r in ranks) for f in ("parts_computed", "parts_skipped", "rows_computed")}
    summary = {
        "rows": n_rows, "parts": total_parts, "world_size": world_size, **totals,
        "skipped_lines": len(index.skipped), "truncated": manifest["truncated"],
        "setup_seconds": round(t_setup - t0, 3), "embed_seconds": round(wall_embed, 3),
        "assemble_seconds": round(time.monotonic() - t_asm, 3),
        "texts_per_s": round(totals["rows_computed"] / wall_embed, 2) if wall_embed > 0 else 0.0,
        "assembled": not already, "ranks": ranks,
    }
    (outdir / "summary.json").write_bytes(json_bytes(summary))  # a log of the last run, not output
    say(out, f"[done] {n_rows} rows, dim {config['dim']}: computed {summary['parts_computed']} parts "
        f"({totals['rows_computed']} rows), reused {summary['parts_skipped']}, skipped {len(index.skipped)} bad lines, "
        f"{manifest['truncated']} texts cut to max_length; "
        f"{summary['texts_per_s']} texts/s over {world_size} rank(s) in {fmt_seconds(wall_embed)} -> {outdir}")
    for r in ranks:
        say(out, f"[done]   rank {r['rank']}: {r['parts_computed']} parts, {r['rows_computed']} rows, "
            f"{r['texts_per_s']} texts/s")
    return summary


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="JSONL file, one {\"id\": ..., \"text\": ...} object per line")
    parser.add_argument("outdir", help="output folder (created; a rerun into it resumes)")
    add_model_options(parser, device="auto")
    g = parser.add_argument_group("the corpus run")
    g.add_argument("--prompt-name", choices=["document", "query"], default="document")
    g.add_argument("--batch-size", type=positive_int, default=32)
    g.add_argument("--part-size", type=positive_int, default=10000, help="rows per output part (default 10000)")
    g.add_argument("--id-field", default="id")
    g.add_argument("--text-field", default="text")
    g.add_argument("--skip-bad-lines", action="store_true", help="leave bad lines out (listed in the manifest)")
    g.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    g.add_argument("--quiet", action="store_true")


def run(args) -> int:
    switches = switches_from_args(args)
    world, device = launch_context(args.device)
    try:
        embedder = embedder_from_args(args, device=device)
        embed_corpus(args.input, args.outdir, embedder, method={"model": args.model, "method": args.method,
                     "switches": switches}, dtype=args.dtype, prompt_name=args.prompt_name,
                     part_size=args.part_size, batch_size=args.batch_size, id_field=args.id_field,
                     text_field=args.text_field, skip_bad_lines=args.skip_bad_lines, log_every=args.log_every,
                     quiet=args.quiet)
        # Leave together: a rank that tears gloo down while rank 0 is still assembling can abort in gloo's
        # worker threads at interpreter exit (SIGABRT after "[done]"), failing a job that did all its work.
        barrier()
    finally:
        if dist.is_initialized():  # on every exit path (success, error, Ctrl-C), while Python is fully alive
            dist.destroy_process_group()
    if world > 1:
        # Even after `destroy_process_group`, a gloo rank could still die with SIGABRT ("terminate called without
        # an active exception") while the interpreter and C++ statics were torn down, after every output file was
        # complete (seen once in 32 two-rank launches on a busy 2-core machine). Every output file is closed and
        # renamed into place and the group is destroyed, so the worker flushes its Python streams, the only
        # buffers `os._exit` would lose, and exits at once, skipping interpreter teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv=None) -> int:
    """`python -m kvembed.corpus ...` = `kvembed embed-corpus ...` (same options, errors and exit codes)."""
    from kvembed.cli import main as cli_main

    return cli_main(["embed-corpus", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
