"""LoRA memory per rank against full fine-tuning, tp_ffn's tensor-parallel MLPs, a Llama built from a config.

    python benchmarks/lora_memory.py --mode lora                          # one process (the dense model)
    torchrun --nproc_per_node 2 benchmarks/lora_memory.py --mode lora     # tp_ffn.hf at TP=2, per rank
    torchrun --nproc_per_node 2 benchmarks/lora_memory.py --mode full     # full fine-tuning at TP=2
    torchrun --nproc_per_node 4 benchmarks/lora_memory.py --mode lora --hidden 2048 --intermediate 5632 \\
        --layers 8 --lora-rank 16 --targets gate_proj,up_proj,down_proj --dtype bfloat16 --tokens 4096

Each rank builds the model (random weights, nothing downloaded), parallelizes its MLPs over the world
(gloo on CPU, NCCL on CUDA), adds LoRA through PEFT (``--mode lora``; the base frozen, the adapters in float32
as PEFT keeps them) or trains everything (``--mode full``), then runs one forward, backward and AdamW step on
``--tokens`` random tokens. It reports, per rank, the bytes of the parameters (all and trainable), of the
gradients after backward (a frozen weight keeps none), of AdamW's state after the step, and how much the peak
grew over the step (CUDA: max_memory_allocated; CPU: the resident set's VmHWM, Linux only). The byte counts
are exact; the peaks are only figures on a quiet machine. Prints one JSON line per rank, rank 0 first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from tp_ffn.shutdown import exit_without_teardown


@dataclass
class Args:
    mode: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    r: int
    targets: str
    dtype: str
    tokens: int
    seq: int


def parse_args(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--lora-rank", dest="r", type=int, default=16, help="LoRA rank r")
    p.add_argument("--targets", default="gate_proj,up_proj,down_proj", help="comma-separated, or all-linear")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the base model's dtype")
    p.add_argument("--tokens", type=int, default=1024, help="tokens in the step's batch")
    p.add_argument("--seq", type=int, default=256, help="sequence length (the batch is tokens / seq sequences)")
    a = p.parse_args(argv)
    if a.tokens % a.seq:
        p.error(f"--tokens: expected a multiple of --seq {a.seq}, got {a.tokens}")
    return Args(**vars(a))


def _bytes(tensors: object) -> int:
    seen = {id(t): t for t in tensors}  # type: ignore[attr-defined]
    return sum(t.numel() * t.element_size() for t in seen.values())


class _Peak:
    """Growth of the peak over a window: CUDA's allocator peak, or the resident set's (VmHWM) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        self.before = self._read()

    def grown(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._read() - self.before


def measure(a: Args, device: torch.device) -> dict[str, object]:
    import transformers

    import tp_ffn.hf

    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, a.dtype))
    tp_ffn.hf.parallelize_mlp(model)
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
        model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.tokens // a.seq, a.seq), device=device, generator=None)
    peak = _Peak(device)
    peak.start()
    model(input_ids=ids, labels=ids).loss.backward()
    grads_bytes = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    frozen_with_grad = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
    opt.step()
    grown = peak.grown()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "device": str(device),
        "params_bytes": _bytes(model.parameters()),
        "trainable_bytes": _bytes(trainable),
        "trainable_params": sum(p.numel() for p in trainable),
        "grads_bytes": grads_bytes,
        "frozen_params_with_grad": frozen_with_grad,
        "optimizer_state_bytes": _bytes(state),
        "step_peak_grew_bytes": grown,
        **asdict(a),
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    row = measure(a, device)
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.barrier()
        dist.destroy_process_group()
    if row["rank"] == 0:
        for r in rows:
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))  # not sys.exit: see tp_ffn/shutdown.py
