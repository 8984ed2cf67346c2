"""Peak memory of loading a Hugging Face checkpoint: tp_ffn.hf.from_pretrained per rank against transformers.

    python benchmarks/hf_memory.py --save /tmp/llama-400m                       # a local LlamaForCausalLM, bf16
    torchrun --nproc_per_node 2 benchmarks/hf_memory.py --path /tmp/llama-400m  # tp_ffn.hf.from_pretrained, per rank
    python benchmarks/hf_memory.py --path /tmp/llama-400m --dense               # transformers' from_pretrained
    torchrun --nproc_per_node 2 benchmarks/hf_memory.py --path /tmp/llama-400m --dense-then-parallelize
                                                 # transformers' from_pretrained, then tp_ffn.hf.parallelize_mlp

Each process reports how much its peak resident set (VmHWM, reset through /proc/self/clear_refs) grew while
the model loaded, next to the bytes of the tensors it holds at the end. Code paths are warmed up on a tiny
model first, so the figure is the load itself. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from tp_ffn.shutdown import exit_without_teardown

MiB = 2**20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def held_bytes(model: torch.nn.Module) -> int:
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def save(path: Path, layers: int, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if path.exists():
        sys.exit(f"--save: {path} exists; choose a new directory")
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=5504, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, torch_dtype=dtype,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, max_shard_size="200MB")
    print(f"saved {path}: {held_bytes(model) / MiB:.0f} MiB in {dtype}")


def load(path: Path, how: str, low_cpu_mem_usage: bool) -> None:
    import transformers

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dense = how == "dense"
    loader = {"dense": transformers.LlamaForCausalLM.from_pretrained, "tp_ffn": _ours, "dense+parallelize": _naive}[how]
    if not dense:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    config = transformers.AutoConfig.from_pretrained(path)
    kwargs = {"torch_dtype": "auto"}
    if low_cpu_mem_usage:
        kwargs["low_cpu_mem_usage"] = True
    # Warm up: import the modelling code, map allocator and loader paths, on a tiny model of the same class.
    tiny = Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_memory_warmup_{os.getpid()}"
    small = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            torch_dtype=config.torch_dtype,
        )
    ).to(config.torch_dtype)
    small.save_pretrained(tiny)
    loader(tiny, **kwargs)
    reset_peak()
    before = peak_bytes()
    model = loader(path, **kwargs)
    # Read every tensor once: a loader may leave them backed by pages of the file not yet read.
    with torch.no_grad():
        for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
            t.amax() if t.is_floating_point() else t.sum()
    grown = peak_bytes() - before
    held = held_bytes(model)
    total = _checkpoint_bytes(path)
    what = "transformers from_pretrained" + (" low_cpu_mem_usage=True" if low_cpu_mem_usage else "")
    if how == "tp_ffn":
        what = f"tp_ffn.hf.from_pretrained at world size {world}"
    elif how == "dense+parallelize":
        what = f"transformers from_pretrained, then tp_ffn.hf.parallelize_mlp at world size {world}"
    row = (int(os.environ.get("RANK", "0")), held, grown)
    rows = [row]
    if not dense:
        import torch.distributed as dist

        rows = [None] * world
        dist.all_gather_object(rows, row)
    if row[0] == 0:
        print(f"{what}; checkpoint {total / MiB:.0f} MiB ({path})")
        print(f"{'rank':>4} {'held MiB':>9} {'peak grew MiB':>14} {'grew/held':>10}")
        for r, h, g in rows:
            print(f"{r:>4} {h / MiB:>9.0f} {g / MiB:>14.0f} {g / h:>10.2f}")
    if not dense:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    for f in tiny.iterdir():
        f.unlink()
    tiny.rmdir()


def _ours(path: Path, **kwargs: object) -> torch.nn.Module:
    import transformers

    import tp_ffn.hf

    kwargs.pop("low_cpu_mem_usage", None)
    return tp_ffn.hf.from_pretrained(transformers.LlamaForCausalLM, path, **kwargs)


def _naive(path: Path, **kwargs: object) -> torch.nn.Module:
    import transformers

    import tp_ffn.hf

    model = transformers.LlamaForCausalLM.from_pretrained(path, **kwargs)
    tp_ffn.hf.parallelize_mlp(model)
    return model


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", type=Path, help="write a LlamaForCausalLM checkpoint here and exit")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--path", type=Path, help="the checkpoint to load")
    p.add_argument("--dense", action="store_true", help="transformers' from_pretrained instead of tp_ffn's")
    p.add_argument(
        "--dense-then-parallelize", action="store_true", help="transformers' from_pretrained, then parallelize_mlp"
    )
    p.add_argument("--low-cpu-mem-usage", action="store_true", help="with --dense: low_cpu_mem_usage=True")
    a = p.parse_args()
    if a.save is not None:
        save(a.save, a.layers, getattr(torch, a.dtype))
    elif a.path is not None:
        how = "dense" if a.dense else "dense+parallelize" if a.dense_then_parallelize else "tp_ffn"
        load(a.path, how, a.low_cpu_mem_usage)
    else:
        p.error("give --save DIR or --path DIR")


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
