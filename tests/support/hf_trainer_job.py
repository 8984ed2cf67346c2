"""One transformers.Trainer run of a tiny Llama, dense in one process or tensor-parallel under torchrun.

    python tests/support/hf_trainer_job.py dense OUT 37 36                  # the references, one process
    torchrun --nproc-per-node 2 tests/support/hf_trainer_job.py tp OUT 37   # TP=2
    torchrun --nproc-per-node 4 tests/support/hf_trainer_job.py tp OUT 37   # TP=2 x DP=2
    torchrun --nproc-per-node 2 tests/support/hf_trainer_job.py unprepared OUT 36

Every run trains the same model (same seed) on the same data with the same global batch (GLOBAL_BATCH
sequences per step: per_device_train_batch_size is GLOBAL_BATCH over the data-parallel replicas), AdamW with
weight decay and clipping at MAX_GRAD_NORM (below the gradient norms, so it clips), then evaluates and saves.
The last argument is the MLP's intermediate size (37: uneven at TP=2; the dense case takes several). Each
rank writes OUT/<size>/result<rank>.json (per-step losses and gradient norms from the Trainer's log, the eval
loss) and rank 0 the saved model in OUT/<size>/model. ``unprepared`` runs a plain Trainer twice: without the
blocks' guard (what happened before it: DDP's broadcast overwrites rank 1's shards and training goes on,
wrong; the size must split evenly, or DDP's own shape check stops it first), then as users run it (the first
forward stops with one line).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 4
STEPS = 4
MAX_GRAD_NORM = 0.5
TP = 2


def _model(intermediate: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=intermediate,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model: torch.nn.Module, out: Path, replicas: int):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=GLOBAL_BATCH // replicas,
        per_device_eval_batch_size=GLOBAL_BATCH // replicas, max_steps=STEPS, learning_rate=1e-2,
        weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=_Tokens(GLOBAL_BATCH * STEPS, 1), eval_dataset=_Tokens(8, 2))


def _log(trainer) -> dict[str, list[float]]:
    steps = [e for e in trainer.state.log_history if "loss" in e]
    return {"loss": [e["loss"] for e in steps], "grad_norm": [e["grad_norm"] for e in steps]}


def dense(out: Path, intermediate: int) -> dict:
    trainer = _trainer(_model(intermediate), out, 1)
    trainer.train()
    result = {**_log(trainer), "eval_loss": trainer.evaluate()["eval_loss"]}
    trainer.save_model(str(out / "model"))
    return result


def tp(out: Path, intermediate: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import tp_ffn.hf as tphf

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // TP, TP), mesh_dim_names=("dp", "tp"))
    model = _model(intermediate)
    tphf.parallelize_mlp(model, mesh["tp"])
    trainer = _trainer(model, out, world // TP)
    tphf.prepare_trainer(trainer)
    trainer.train()
    result = {**_log(trainer), "eval_loss": trainer.evaluate()["eval_loss"]}
    trainer.save_model(str(out / "model"))
    return result


def unprepared(out: Path, intermediate: int) -> dict:
    import torch.distributed as dist
    from transformers import TrainerCallback

    import tp_ffn.hf as tphf
    from tp_ffn.hf.guard import unguard

    class AtStart(TrainerCallback):
        """The first MLP shard as training starts (after the Trainer has wrapped the model)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.shard = model.model.layers[0].mlp.gate_proj.weight.detach().clone()

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    result: dict = {}
    # Before: no guard. DDP's constructor broadcasts rank 0's shards; training runs to the end.
    model = _model(intermediate)
    tphf.parallelize_mlp(model)
    for module in model.modules():
        unguard(module)
    mine = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    originals = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(originals, mine)
    trainer, at_start = _trainer(model, out, world), AtStart()
    trainer.add_callback(at_start)
    trainer.train()
    result["unguarded"] = {
        **_log(trainer),
        "global_step": trainer.state.global_step,
        "own shard at start": torch.equal(at_start.shard, originals[rank]),
        "rank 0's shard at start": torch.equal(at_start.shard, originals[0]),
    }
    sd = tphf.full_state_dict(model)
    if rank == 0:
        model.save_pretrained(str(out / "unguarded"), state_dict=sd)
    # After: the same Trainer on a freshly parallelized model stops before it trains.
    return {**result, **refused(out, intermediate)}


def refused(out: Path, intermediate: int) -> dict:
    """A plain Trainer on a parallelized model: the error it stops with (None if it trained)."""
    import torch.distributed as dist

    import tp_ffn.hf as tphf

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = _model(intermediate)
    tphf.parallelize_mlp(model)
    trainer = _trainer(model, out, dist.get_world_size())
    result: dict = {}
    try:
        trainer.train()
        result["error"] = None
    except RuntimeError as e:
        result["error"] = str(e)
    result["global_step"] = trainer.state.global_step
    return result


def main(argv: list[str]) -> None:
    case, root, sizes = argv[0], Path(argv[1]), [int(a) for a in argv[2:]]
    rank = int(os.environ.get("RANK", "0"))
    for size in sizes:
        out = root / str(size)
        out.mkdir(parents=True, exist_ok=True)
        result = {"dense": dense, "tp": tp, "unprepared": unprepared, "refused": refused}[case](out, size)
        result["transformers"] = __import__("transformers").__version__
        (out / f"result{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
