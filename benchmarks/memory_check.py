"""The memory plan against measured peaks: short training runs of several shapes and layouts.

    OMP_NUM_THREADS=1 python benchmarks/memory_check.py --out runs/memory_check

Each configuration is a 2-step ``scripts/train.py`` run under torchrun (gloo on CPU, NCCL on
GPUs). train.py prints its plan before building anything and, at the end, the peak it measured on
its busiest rank: on CPU the growth of the resident set's high-water mark (VmHWM) since the plan,
on CUDA ``torch.cuda.max_memory_allocated`` over what was allocated at the plan. This script
collects both per configuration and writes a Markdown table and JSON (``--out``); ``--only``
picks configurations by name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ~100 M parameters, byte-level: dim 768, 14 layers, hidden 2048.
M100 = ["--preset", "small", "--model-args", "dim=768,n_layers=14,n_heads=12,n_kv_heads=12,multiple_of=256"]
SHORT = ["--steps", "2", "--val-every", "0", "--val-sequences", "2", "--corpus-bytes", "400000", "--no-progress"]
SHORT += ["--return-freed-memory"]  # on CPU the resident set then follows the tensors (no effect on GPUs)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "tiny tp1": (1, ["--preset", "tiny", "--seq-len", "128", "--batch-size", "8"]),
    "tiny tp2": (2, ["--preset", "tiny", "--tp", "2", "--seq-len", "128", "--batch-size", "8"]),
    "small tp1": (1, ["--preset", "small", "--seq-len", "256", "--batch-size", "8"]),
    "small tp1 ac": (1, ["--preset", "small", "--seq-len", "256", "--batch-size", "8", "--activation-checkpointing"]),
    "small tp2 sp": (2, ["--preset", "small", "--tp", "2", "--sequence-parallel", "--seq-len", "256", "--batch-size", "8"]),
    "small dp2 bf16": (2, ["--preset", "small", "--dp", "2", "--seq-len", "256", "--batch-size", "8", "--dtype", "bfloat16"]),
    "100M tp1": (1, [*M100, "--seq-len", "256", "--batch-size", "4"]),
    "100M tp1 ac": (1, [*M100, "--seq-len", "256", "--batch-size", "4", "--activation-checkpointing"]),
    "100M tp2": (2, [*M100, "--tp", "2", "--seq-len", "256", "--batch-size", "4"]),
    "100M dp2": (2, [*M100, "--dp", "2", "--seq-len", "256", "--batch-size", "4"]),
}  # fmt: skip
PLAN = re.compile(r"memory plan: ([\d.]+) GiB per rank \((.*?) GiB\)")
PEAK = re.compile(r"memory: peak ([\d.]+) GiB on the busiest rank \(([^)]*)\), estimated ([\d.]+) GiB")


def run(name: str, nproc: int, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["scripts/train.py", *args, *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    plan, peak = PLAN.search(r.stdout), PEAK.search(r.stdout)
    if r.returncode or not plan or not peak:
        return {"name": name, "error": (r.stdout + r.stderr)[-2000:], "command": " ".join(cmd[2:])}
    measured, expected = float(peak.group(1)), float(peak.group(3))
    return {
        "name": name, "ranks": nproc, "command": " ".join(cmd[2:]), "plan_gib": float(plan.group(1)),
        "parts": plan.group(2), "compared_gib": expected, "measured_gib": measured, "how": peak.group(2),
        "error_pct": 100 * (expected - measured) / measured,
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    out = [
        "| configuration | ranks | estimate GiB | parts (GiB) | measured peak GiB | estimate error |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | | failed | | | |")
            continue
        out.append(
            f"| {r['name']} | {r['ranks']} | {r['compared_gib']:.2f} | {r['parts']} | {r['measured_gib']:.2f} "
            f"| {r['error_pct']:+.0f}% |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/memory_check", help="directory for memory_check.json and .md")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        print(f"memory_check.py: --only: unknown {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        nproc, args = CONFIGS[name]
        rows.append(run(name, nproc, args, a.timeout))
        r = rows[-1]
        print(f"{name}: " + (f"estimate {r['compared_gib']:.2f} GiB, measured {r['measured_gib']:.2f} GiB ({r['error_pct']:+.0f}%)" if "error" not in r else "FAILED\n" + r["error"]), flush=True)  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_check.json").write_text(json.dumps(rows, indent=1))
    (out / "memory_check.md").write_text(markdown(rows))
    print(markdown(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
