"""State-dict names for the feed-forward block (Meta / Hugging Face) and their validation.

Meta's Llama code and this package name the projections ``w1`` (gate), ``w3`` (up) and ``w2``
(down); Hugging Face's ``LlamaMLP`` names them ``gate_proj``, ``up_proj`` and ``down_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = [
    "HF_TO_META",
    "META_TO_HF",
    "canonical_ffn_state_dict",
    "check_ffn_state_dict",
    "ffn_shapes",
    "infer_ffn_dims",
]

HF_TO_META = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
META_TO_HF = {meta: hf for hf, meta in HF_TO_META.items()}
_SUFFIXES = ("weight", "bias")


def canonical_ffn_state_dict(
    sd: Mapping[str, Tensor], name: str = "state_dict"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a Meta- or HF-style FFN state dict to Meta keys.

    Returns ``(canonical, original)``: ``canonical`` maps ``w1.weight`` ... to the tensors and
    ``original`` maps each Meta key back to the key the caller used (for error messages).
    Raises ``ValueError`` for keys that belong to neither naming or for a mix of both.
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"{name}: expected a mapping of str to Tensor, got {type(sd).__name__}")
    canonical: dict[str, Tensor] = {}
    original: dict[str, str] = {}
    styles: set[str] = set()
    for key, value in sd.items():
        module, _, suffix = str(key).rpartition(".")
        if suffix not in _SUFFIXES or module not in {*HF_TO_META, *META_TO_HF}:
            raise ValueError(
                f"{name}: unexpected key {key!r}; expected w1/w2/w3 (Meta) or gate_proj/down_proj/up_proj "
                f"(Hugging Face) followed by .weight or .bias"
            )
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
        styles.add("hf" if module in HF_TO_META else "meta")
        meta_key = f"{HF_TO_META.get(module, module)}.{suffix}"
        canonical[meta_key] = value
        original[meta_key] = key
    if len(styles) > 1:
        raise ValueError(
            f"{name}: expected either Meta (w1/w2/w3) or Hugging Face (gate/up/down_proj) keys, got a mix: {sorted(sd)}"
        )
    return canonical, original


def ffn_shapes(dim: int, hidden_dim: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every tensor of the block, by Meta key."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, out, inp in (("w1", hidden_dim, dim), ("w2", dim, hidden_dim), ("w3", hidden_dim, dim)):
        shapes[f"{name}.weight"] = (out, inp)
        if bias:
            shapes[f"{name}.bias"] = (out,)
    return shapes


def infer_ffn_dims(
    canonical: Mapping[str, Tensor], original: Mapping[str, str], name: str = "state_dict"
) -> tuple[int, int, bool]:
    """``(dim, hidden_dim, bias)`` of a full state dict, read off w1's weight and checked against every key."""
    w1 = canonical.get("w1.weight")
    if w1 is None or w1.dim() != 2:
        got = "no such key" if w1 is None else f"shape {tuple(w1.shape)}"
        raise ValueError(f"{name}: expected a 2-D 'w1.weight' (or 'gate_proj.weight'), got {got}")
    hidden_dim, dim = w1.shape
    bias = "w1.bias" in canonical
    check_ffn_state_dict(canonical, original, ffn_shapes(dim, hidden_dim, bias), name)
    return dim, hidden_dim, bias


def check_ffn_state_dict(
    canonical: Mapping[str, Tensor],
    original: Mapping[str, str],
    expected: Mapping[str, tuple[int, ...]],
    name: str = "state_dict",
) -> None:
    """Raise ``ValueError`` naming every missing or unexpected key, or the first wrong shape."""
    missing = [k for k in expected if k not in canonical]
    extra = [original[k] for k in canonical if k not in expected]
    if missing or extra:
        hf = any(k.split(".")[0] in HF_TO_META for k in original.values())
        shown = [f"{META_TO_HF[k.split('.')[0]]}.{k.split('.')[1]}" if hf else k for k in missing]
        raise ValueError(
            f"{name}: missing keys {shown}, unexpected keys {extra} "
            f"(expected exactly {sorted(expected)} or their Hugging Face names)"
        )
    for key, shape in expected.items():
        got = tuple(canonical[key].shape)
        if got != shape:
            raise ValueError(f"{name}[{original[key]!r}]: expected shape {shape}, got {got}")
