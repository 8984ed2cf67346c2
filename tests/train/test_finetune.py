"""Fine-tuning a pretrained model with its own tokenizer, end to end, on a tiny Hugging Face Llama
made here (scripts/make_tiny_pretrained.py: a BPE tokenizer and random weights, no download).

- ``--eval-only`` of the pretrained weights at TP=2 gives transformers' own loss on the same token
  sequences (1e-5: both compute the same float32 function; the summation order differs);
- fine-tuning at TP=1 and TP=2 gives the same losses (1e-4, the training issue's bar); the first
  step's loss is transformers' loss on the first training batch, so the stream is the tokenizer's;
- checkpoints carry the tokenizer (files listed in meta.json, fingerprint checked), and
  ``--eval-only --resume`` reproduces the last validation loss;
- sample.py decodes with it at TP=1 and TP=2 alike, also from ``--init-from``;
- the export to Hugging Face gives transformers' logits equal to ours and AutoTokenizer's ids equal
  to ours, for HF, tiktoken and SentencePiece tokenizers; the Meta export reloads bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.rankpool import run_ranks
from support.tokfixtures import make_sentencepiece_model, make_tiktoken_file

from tp_ffn.train import TrainConfig, UsageError, train
from tp_ffn.train.data.corpus import Windows, load_corpus, validation_batch
from tp_ffn.train.data.token_cache import CacheOptions
from tp_ffn.train.data.tokenizers import resolve_tokenizer, tokenizer_from_checkpoint
from tp_ffn.train.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SEQ, BATCH, NVAL = 32, 8, 8


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ft")
    pre = root / "pretrained"
    args = [str(pre), "--text-bytes", "300000", "--vocab-size", "384", "--dim", "64", "--layers", "2", "--seed", "1"]
    args += ["--init-std", "0.2"]  # weights far from uniform predictions: losses differ between windows
    assert _script("make_tiny_pretrained").main(args) == 0
    # Fine-tuning text unlike the pretraining text: the paragraphs of docs/training.md, one document each.
    paragraphs = [p for p in (ROOT / "docs" / "training.md").read_text().split("\n\n") if p.strip()]
    data = root / "training_md.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    base = {
        "init_from": str(pre),
        "data": str(data),
        "token_cache": str(root / "cache"),
        "seq_len": SEQ,
        "batch_size": BATCH,
        "val_sequences": NVAL,
        "val_every": 5,
        "steps": 10,
        "lr": 3e-3,
        "warmup_steps": 2,
        "seed": 0,
        "progress": False,
    }
    return {"root": root, "pre": pre, "data": data, "base": base}


def _train(rank: int, world: int, kw: dict) -> dict:
    res = train(TrainConfig(**kw))
    return {"losses": res.losses, "val": res.val_losses, "step": res.final_step}


def _corpus(setup: dict):
    tok = resolve_tokenizer("auto", init_from=setup["pre"])
    corpus = load_corpus(
        str(setup["data"]), corpus_bytes=1, val_fraction=0.05, seq_len=SEQ, tokenizer=tok,
        cache=CacheOptions(setup["root"] / "cache"),
    )  # fmt: skip
    return tok, corpus


def _hf_loss(model_dir: Path, tokens: torch.Tensor) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()  # mean over tokens[:, 1:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_only_is_transformers_loss_under_its_tokenizer(setup):
    metrics = setup["root"] / "eval" / "metrics.jsonl"
    kw = {**setup["base"], "tp": 2, "eval_only": True, "ckpt_dir": str(setup["root"] / "eval"), "metrics": str(metrics)}
    got = run_ranks(2, _train, kw, timeout=240)[0]
    assert got["losses"] == [] and len(got["val"]) == 1 and got["val"][0][0] == 0
    val = got["val"][0][1]
    tok, corpus = _corpus(setup)
    windows = validation_batch(corpus.val, SEQ, 0, NVAL)
    assert tok.bos_id in corpus.train.tolist() and tok.eos_id in corpus.train.tolist()
    want = _hf_loss(setup["pre"], windows)
    assert abs(val - want) / want < 1e-5, (val, want)
    # Negative control: the same comparison on other windows is off by well over the tolerance (10x;
    # by how much depends on the text, which is docs/training.md's and changes with it).
    assert abs(val - _hf_loss(setup["pre"], validation_batch(corpus.val, SEQ, 1, NVAL))) / want > 1e-4
    rows = read_metrics(metrics)
    assert rows == [{"step": 0, "val_loss": val, "val_ppl": pytest.approx(math.exp(val))}]
    assert not list((setup["root"] / "eval").glob("step_*")), "--eval-only writes no checkpoint"


@pytest.fixture(scope="module")
def finetuned(setup) -> dict:
    one = run_ranks(1, _train, {**setup["base"], "tp": 1, "ckpt_dir": str(setup["root"] / "tp1")}, timeout=240)[0]
    two = run_ranks(2, _train, {**setup["base"], "tp": 2, "ckpt_dir": str(setup["root"] / "tp2")}, timeout=240)[0]
    return {"tp1": one, "tp2": two, "ckpt": setup["root"] / "tp2"}


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_tp1_matches_tp2_on_the_tokenizers_stream(setup, finetuned):
    one, two = finetuned["tp1"], finetuned["tp2"]
    assert len(one["losses"]) == 10 and _max_rel(two["losses"], one["losses"]) < 1e-4
    assert [s for s, _ in two["val"]] == [5, 10]
    assert _max_rel([v for _, v in two["val"]], [v for _, v in one["val"]]) < 1e-4
    first, last = sum(one["losses"][:3]) / 3, sum(one["losses"][-3:]) / 3  # batches differ: average a few
    assert last < first - 0.2, ("fine-tuning should lower the loss", one["losses"])
    # Step 1's loss is the pretrained model's loss (transformers) on the first batch of tokens.
    tok, corpus = _corpus(setup)
    first = Windows(corpus.train, SEQ, seed=0).batch(0, BATCH)
    want = _hf_loss(setup["pre"], first)
    assert abs(one["losses"][0] - want) / want < 1e-5
    # The checkpoint carries its tokenizer, listed in meta.json beside DCP's files.
    step = finetuned["ckpt"] / "step_00000010"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    for name in meta["tokenizer"]["files"]:
        assert meta["files"][name]["size"] == (step / name).stat().st_size == (setup["pre"] / name).stat().st_size
    assert tokenizer_from_checkpoint(finetuned["ckpt"]).fingerprint == tok.fingerprint
    rows = read_metrics(finetuned["ckpt"] / "metrics.jsonl")
    assert [r["tokens"] for r in rows if "loss" in r] == [s * BATCH * SEQ for s in range(1, 11)]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in rows if "val_loss" in r)
    # --eval-only --resume: the checkpoint's validation loss again, at its step, appended.
    kw = {**setup["base"], "tp": 1, "eval_only": True, "resume": True, "ckpt_dir": str(finetuned["ckpt"])}
    again = run_ranks(1, _train, kw, timeout=240)[0]
    assert again["val"][0][0] == 10 and abs(again["val"][0][1] - two["val"][-1][1]) < 1e-5
    assert read_metrics(finetuned["ckpt"] / "metrics.jsonl")[-1]["step"] == 10
    assert sorted(p.name for p in finetuned["ckpt"].glob("step_*")) == ["step_00000010"]
    # The same without naming the pretrained model again: the checkpoint's model and tokenizer.
    kw = {k: v for k, v in kw.items() if k != "init_from"}
    bare = run_ranks(1, _train, kw, timeout=240)[0]
    assert bare["val"] == again["val"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _run(*cmd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _samples(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sample_decodes_with_the_runs_tokenizer_at_any_tp(setup, finetuned):
    args = ["--ckpt-dir", str(finetuned["ckpt"]), "--prompt", "Tensor parallel", "--max-new-tokens", "16"]
    args += ["--num-samples", "2", "--seed", "3", "--top-p", "0.8", "--temperature", "0.9"]
    one = _run(sys.executable, "scripts/sample.py", *args)
    two = _run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/sample.py", *args
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "hf tokenizer" in one.stdout and "top-p 0.8" in one.stdout
    assert _samples(one.stdout) == _samples(two.stdout)
    lines = _samples(one.stdout)
    assert lines[0] == "--- sample 1" and lines[1].startswith("Tensor parallel")
    greedy = _run(sys.executable, "scripts/sample.py", "--init-from", str(setup["pre"]), "--prompt", "def ",
                  "--temperature", "0", "--max-new-tokens", "8")  # fmt: skip
    assert greedy.returncode == 0 and _samples(greedy.stdout)[1].startswith("def "), greedy.stderr[-2000:]
    bad = _run(sys.executable, "scripts/sample.py", "--ckpt-dir", str(finetuned["ckpt"]), "--top-p", "0")
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "sample.py: error: --top-p: expected a number in (0, 1]"
    )


def _our_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from tp_ffn.train.run.generate import load_checkpoint_model

    model, _ = load_checkpoint_model(ckpt)
    with torch.no_grad():
        return model(tokens)


def _check_hf_export(ckpt: Path, dst: Path, text: str) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    r = _run(sys.executable, "scripts/convert_checkpoint.py", "--from", "train", "--to", "hf", str(ckpt), str(dst))
    assert r.returncode == 0, r.stderr[-2000:]
    tok = tokenizer_from_checkpoint(ckpt)
    hf_tok = AutoTokenizer.from_pretrained(dst)
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.prompt(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(dst).eval()(x).logits
    ours = _our_logits(ckpt, x)
    assert (theirs - ours).abs().max().item() < 1e-5 * ours.abs().max().item() + 1e-6
    cfg = json.loads((dst / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_id, tok.eos_id)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_round_trip(setup, finetuned, tmp_path):
    from tp_ffn.models import Transformer, config_from_pretrained, load_pretrained
    from tp_ffn.train.checkpoint.store import load_full_tensors

    _check_hf_export(finetuned["ckpt"], tmp_path / "hf", "Fine-tune, then export back.")
    r = _run(sys.executable, "scripts/convert_checkpoint.py", "--from", "train", "--to", "meta", "--num-shards", "2",
             str(finetuned["ckpt"]), str(tmp_path / "meta"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "meta").iterdir()
    }
    model = Transformer(config_from_pretrained(tmp_path / "meta"), device="meta")
    load_pretrained(model, tmp_path / "meta")
    saved = load_full_tensors(finetuned["ckpt"] / "step_00000010")
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert (
        resolve_tokenizer("auto", init_from=tmp_path / "meta").fingerprint
        == tokenizer_from_checkpoint(finetuned["ckpt"]).fingerprint
    )
    bad = _run(
        sys.executable,
        "scripts/convert_checkpoint.py",
        "--from",
        "train",
        "--to",
        "hf",
        str(tmp_path),
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and "no complete checkpoint" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece"])
def test_meta_tokenizers_train_and_export(tmp_path, kind):
    """A run with a Meta tokenizer.model (Llama 3 tiktoken / Llama 2 SentencePiece): the HF export's
    AutoTokenizer and LlamaForCausalLM agree with the checkpoint; the Meta export keeps tokenizer.model."""
    path = tmp_path / "tok" / "tokenizer.model"
    (make_tiktoken_file if kind == "tiktoken" else make_sentencepiece_model)(path)
    tok = resolve_tokenizer(str(path))
    kw = {
        "preset": "tiny",
        "model_args": {"vocab_size": tok.vocab_size + 3},
        "tokenizer": str(path),
        "steps": 2,
        "seq_len": SEQ,
        "batch_size": 4,
        "corpus_bytes": 60_000,
        "val_sequences": 2,
        "token_cache": str(tmp_path / "cache"),
        "ckpt_dir": str(tmp_path / "ck"),
        "progress": False,
    }
    run_ranks(1, _train, kw, timeout=240)
    assert tokenizer_from_checkpoint(tmp_path / "ck").fingerprint == tok.fingerprint
    _check_hf_export(tmp_path / "ck", tmp_path / "hf", "Grüße, tokens 12345!")
    r = _run(
        sys.executable,
        "scripts/convert_checkpoint.py",
        "--from",
        "train",
        "--to",
        "meta",
        str(tmp_path / "ck"),
        str(tmp_path / "meta"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == path.read_bytes()


def test_vocabulary_that_does_not_fit_is_refused_before_training(tmp_path):
    path = make_tiktoken_file(tmp_path / "tokenizer.model")
    kw = {
        "preset": "tiny",
        "tokenizer": str(path),
        "steps": 2,
        "seq_len": SEQ,
        "ckpt_dir": str(tmp_path / "ck"),
        "progress": False,
    }
    with pytest.raises(AssertionError, match=r"vocab_size \(256\) must be >= \d+ for its tiktoken tokenizer"):
        run_ranks(1, _train, kw, timeout=120)
    assert not (tmp_path / "ck").exists()
    with pytest.raises(UsageError, match=r"--eval-only: needs --init-from or --resume"):
        TrainConfig(eval_only=True)


def _sample_with_fixed_continuation(rank: int, world: int, pre: str, continuation: list[int]) -> tuple[str, list]:
    import contextlib
    import io

    from tp_ffn import sample

    asked = []

    def generate(model, prompt, n, *, stop_tokens=(), **kw):
        asked.append((prompt, sorted(stop_tokens)))
        out = list(continuation)  # what the model "wrote", up to the first stop token (generate's contract)
        cut = [i for i, t in enumerate(out) if t in stop_tokens]
        return out[: cut[0]] if cut else out

    sample.generate = generate
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sample.main(["--init-from", pre, "--prompt", "x", "--max-new-tokens", "4"]) == 0
    return out.getvalue(), asked


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sample_ends_at_eos_and_starts_with_bos(setup):
    tok = resolve_tokenizer("auto", init_from=setup["pre"])
    a, b = tok.encode(" alpha"), tok.encode(" beta")
    out, asked = run_ranks(1, _sample_with_fixed_continuation, str(setup["pre"]), [*a, tok.eos_id, *b], timeout=120)[0]
    assert out.splitlines()[-1] == "x alpha", out
    assert asked == [([tok.bos_id, *tok.encode("x")], [tok.eos_id])]
