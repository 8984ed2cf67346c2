"""transformers.Trainer step time: a Llama trained dense in one process against the same model at TP=2
(tp_ffn.hf.parallelize_mlp + tp_ffn.hf.prepare_trainer), with the same global batch.

    python benchmarks/bench_hf_trainer.py --out bench_out/hf_trainer.json
    python benchmarks/bench_hf_trainer.py --hidden 64 --intermediate 172 --layers 1 --steps 3 --warmup 1   # smoke

The driver (this file without --role) runs ``--role dense`` in one process, then ``--role tp`` under
``torchrun --standalone --nproc-per-node <tp>``. Each role trains for --warmup + --steps steps (AdamW,
clipping at 1.0 as the Trainer's default) and times every step from the Trainer's step-begin to step-end
callbacks (CUDA synchronized); the driver writes both lists, their medians, the ratio tp / dense and the
machine. Needs transformers >= 5 (prepare_trainer). CPU: gloo, float32; CUDA: NCCL, bf16 (one GPU per rank).
Figures must be taken on a quiet machine; a loaded one gives noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BenchArgs:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 4
    heads: int = 16
    vocab: int = 4096
    seq: int = 256
    global_batch: int = 8
    tp: int = 2
    steps: int = 20
    warmup: int = 3
    out: str = "bench_out/hf_trainer.json"

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "vocab", "seq", "global_batch", "tp", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden: expected a multiple of --heads ({self.heads}), got {self.hidden}")
        if self.warmup < 0:
            raise ValueError(f"--warmup: expected an int >= 0, got {self.warmup}")


def _model(a: BenchArgs, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _tokens(n: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(a: BenchArgs, role: str) -> list[float]:
    """Per-step wall times of one Trainer run (``role``: dense or tp)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    replicas = 1
    model = _model(a, torch.bfloat16 if cuda else torch.float32)
    if role == "tp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        import tp_ffn.hf as tphf

        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        replicas = dist.get_world_size() // a.tp
        mesh = init_device_mesh("cuda" if cuda else "cpu", (replicas, a.tp), mesh_dim_names=("dp", "tp"))
        tphf.parallelize_mlp(model, mesh["tp"])

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(None)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(None)
            times.append(time.perf_counter() - self.start)

    steps = a.warmup + a.steps
    args = TrainingArguments(
        output_dir="/tmp/bench_hf_trainer", per_device_train_batch_size=a.global_batch // replicas,
        max_steps=steps, learning_rate=1e-4, save_strategy="no", report_to=[], logging_steps=steps,
        use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_tokens(a.global_batch * steps, a.seq, a.vocab), callbacks=[Clock()]
    )
    if role == "tp":
        tphf.prepare_trainer(trainer)
    trainer.train()
    return times[a.warmup :]


def _machine() -> dict[str, object]:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg(),
    }


def _drive(a: BenchArgs, argv: list[str]) -> dict[str, object]:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    me = [str(Path(__file__).resolve()), *argv]
    runs = {
        "dense": [sys.executable, *me, "--role", "dense"],
        "tp": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.tp}", *me,
               "--role", "tp"],
    }  # fmt: skip
    result: dict[str, object] = {"args": asdict(a), "machine": _machine()}
    for role, cmd in runs.items():
        part = out.with_suffix(f".{role}.json")
        part.unlink(missing_ok=True)
        subprocess.run(cmd, env=env, check=True)
        times = json.loads(part.read_text())
        result[role] = {"step_s": times, "median_s": statistics.median(times)}
    result["tp_over_dense"] = result["tp"]["median_s"] / result["dense"]["median_s"]
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(BenchArgs()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--role", choices=("dense", "tp"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    role = ns.role
    try:
        a = BenchArgs(**{k: v for k, v in vars(ns).items() if k != "role"})
    except ValueError as e:
        parser.error(str(e))
    if role is None:
        result = _drive(a, argv)
        print(f"dense {result['dense']['median_s']:.4f} s/step, TP={a.tp} {result['tp']['median_s']:.4f} s/step, "
              f"ratio {result['tp_over_dense']:.3f} -> {a.out}")  # fmt: skip
        return
    times = _train(a, role)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.out).with_suffix(f".{role}.json").write_text(json.dumps(times))


if __name__ == "__main__":
    main(sys.argv[1:])
