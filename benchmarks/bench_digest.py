"""What the checkpoint digests cost: hash throughput, and the digests' share of a save and a resume.

    OMP_NUM_THREADS=1 python benchmarks/bench_digest.py --repeats 3

One process builds a float32 Llama model (default: dim 2048, 3 layers, vocabulary 32000: 1.14 GB of
weights) and saves it with the training job's own code (``TrainingState.save``: DCP writer, fsync,
digests, meta.json, rename) into ``--dir``, ``--repeats`` times, and reports per save: the total time, the time spent digesting (each file of the save,
right after it is written, from the page cache), and their ratio. Then, on the last checkpoint:
``verify_checkpoint`` with and without the data files' digests (what ``--no-verify-checkpoint``
saves on a resume), and the throughput of SHA-256 (what is used) next to other hashes of the
standard library and, when installed, ``blake3`` and ``xxhash`` (``--algorithms``). All reads are
from the page cache unless ``--drop-caches`` (root only; it drops every process's cache on the
machine) makes the verification read from disk.

A table is printed and JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tp_ffn.models.llama import LlamaConfig, Transformer
from tp_ffn.train.checkpoint import saving
from tp_ffn.train.checkpoint import store as ck


def _hashers() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {
        name: (lambda n=name: hashlib.new(n)) for name in ("sha256", "blake2b", "sha1", "md5")
    }
    try:
        import blake3

        out["blake3"] = blake3.blake3
    except ImportError:
        pass
    try:
        import xxhash

        out["xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    return out


def _hash_rate(paths: list[Path], make: Callable[[], object], block: int = 1 << 20) -> float:
    """MB/s of hashing ``paths`` (read in ``block`` pieces, as the checkpoint code does)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for path in paths:
        h = make()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                total += n
    return total / (time.perf_counter() - t0) / 1e6


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3, help="saves to time (the median is reported)")
    p.add_argument("--dir", type=Path, default=Path("runs/bench_digest/ckpt"), help="scratch --ckpt-dir (emptied)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_digest/digest.json"))
    p.add_argument("--algorithms", default=",".join(_hashers()), help="hashes whose throughput to measure")
    p.add_argument("--drop-caches", action="store_true", help="verify from disk, not the page cache (root only)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    hashers = _hashers()
    unknown = sorted(set(args.algorithms.split(",")) - set(hashers))
    if unknown:
        p.error(f"--algorithms: {unknown} are not available here; choose from {sorted(hashers)}")

    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 128), vocab_size=args.vocab)
    torch.manual_seed(0)
    state = ck.TrainingState(Transformer(cfg))
    nbytes = cfg.num_params() * 4
    shutil.rmtree(args.dir, ignore_errors=True)

    real_digest = saving.file_digest
    spent = {"digest": 0.0}

    def timed_digest(path: str | os.PathLike) -> str:
        t0 = time.perf_counter()
        try:
            return real_digest(path)
        finally:
            spent["digest"] += time.perf_counter() - t0

    saving.file_digest = timed_digest  # what a save calls for each file it wrote
    saves = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            for step in range(1, args.repeats + 1):
                spent["digest"] = 0.0
                t0 = time.perf_counter()
                path = state.save(args.dir, step, 0, {"model": dataclasses.asdict(cfg)}, keep_last=1)
                total = time.perf_counter() - t0
                saves.append({"save_s": total, "digest_s": spent["digest"], "share": spent["digest"] / total})
    finally:
        saving.file_digest = real_digest
    assert path is not None
    files = sorted(p for p in path.iterdir() if p.name != "meta.json")
    info = ck.open_checkpoint(path)
    verify = {}
    for digests in (True, False):
        if args.drop_caches:
            _drop_caches()
        t0 = time.perf_counter()
        ck.verify_checkpoint(info, digests=digests)
        verify["with_digests_s" if digests else "without_digests_s"] = time.perf_counter() - t0
    rates = {name: _hash_rate(files, hashers[name]) for name in args.algorithms.split(",")}

    med = {k: statistics.median(s[k] for s in saves) for k in saves[0]}
    result = {
        "model": dataclasses.asdict(cfg), "bytes": nbytes, "files": [f.name for f in files], "saves": saves, "median": med, "verify": verify,
        "hash_MBps": rates, "cache": "disk (dropped)" if args.drop_caches else "page cache",
        "torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    gb = nbytes / 1e9
    print(f"checkpoint of {nbytes / 2**30:.2f} GiB in {len(files)} files ({result['cache']}), {args.repeats} saves")
    print(f"save (median)           {med['save_s']:8.2f} s   ({gb / med['save_s'] * 1e3:7.0f} MB/s)")
    print(
        f"  of which SHA-256      {med['digest_s']:8.2f} s   ({gb / max(med['digest_s'], 1e-9) * 1e3:7.0f} MB/s)  = {med['share']:.1%} of the save"
    )
    print(f"verify, with digests    {verify['with_digests_s']:8.2f} s")
    print(f"verify, without         {verify['without_digests_s']:8.2f} s   (--no-verify-checkpoint)")
    for name, rate in rates.items():
        print(f"hash {name:<18} {rate:8.0f} MB/s")
    print(f"wrote {args.out}")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
