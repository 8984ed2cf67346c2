"""tp_ffn.hf.from_pretrained must not hold the dense model on any rank: its peak is what the rank keeps.

Measured as in test_init_memory.py: growth of the peak resident set (VmHWM, reset through
/proc/self/clear_refs) in fresh processes, every loaded tensor read once inside the window (a loader may
leave tensors backed by pages of the file not yet read). The control loads the dense model with
transformers in the same process afterwards and must raise the peak by about the whole checkpoint,
showing the measurement can see it. benchmarks/hf_memory.py takes docs/huggingface.md's figures on a larger model.
"""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_fresh

_TRANSFORMERS_MAJOR = int(pytest.importorskip("transformers").__version__.split(".")[0])

MiB = 2**20
CHUNK = 4 * MiB  # the reader's chunk, made small here so that a small model shows the difference


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def _held(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_and_measure(loader, path: str) -> tuple[torch.nn.Module, int]:
    _reset_peak()
    before = _peak()
    model = loader(path)
    with torch.no_grad():
        for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
            t.amax()
    return model, _peak() - before


def _measure(rank: int, world: int, path: str, warmup: str) -> dict[str, float]:
    import transformers

    import tp_ffn.hf as tphf
    from tp_ffn import safetensors_dir

    safetensors_dir.CHUNK_BYTES = CHUNK
    cls = transformers.LlamaForCausalLM
    tphf.from_pretrained(cls, warmup)  # import and map the code paths on a tiny model first
    cls.from_pretrained(warmup)
    ours, grown = _load_and_measure(lambda p: tphf.from_pretrained(cls, p), path)
    held = _held(ours)
    del ours
    dense, control = _load_and_measure(cls.from_pretrained, path)
    return {"held": held / MiB, "grown": grown / MiB, "dense": _held(dense) / MiB, "control": control / MiB}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_peak_memory_is_what_the_rank_keeps(tmp_path):
    import transformers

    def save(where, **sizes):
        config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **sizes)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(where, max_shard_size="20MB")

    # 44 MiB of float32, 33 MiB of it in the MLPs (intermediate 1500 is uneven over 2).
    save(tmp_path / "model", vocab_size=2000, hidden_size=256, intermediate_size=1500, num_hidden_layers=8)
    save(tmp_path / "tiny", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1)
    for r in run_fresh(2, _measure, str(tmp_path / "model"), str(tmp_path / "tiny"), timeout=160):
        assert r["held"] < 0.7 * r["dense"], r  # half of every MLP
        # What the rank keeps plus one chunk of the file and a few MiB of scratch: never the dense model.
        assert r["grown"] < r["held"] + CHUNK / MiB + 6, r
        # The negative control, under transformers 4.x (the suite's main run): its own load holds the dense
        # model at its peak, so the measurement sees a dense load. transformers 5 loads lazily (25-37 MiB
        # against 45 dense, varying run to run), so there it shows nothing and is not asserted.
        if _TRANSFORMERS_MAJOR < 5:
            assert r["control"] > 0.9 * r["dense"], r
