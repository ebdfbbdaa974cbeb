"""Import checkpoints of the official Llip release (facebookresearch/Llip, built on open_clip).

Flow: checkpoint file (``torch.save`` of ``{"epoch", "state_dict", ...}`` or a bare state dict;
memory-mapped, nothing else is loaded) -> keys without the ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes -> aliases folded in -> the model config (given, or detected among
``configs/official/*.yaml`` from the shapes) -> every key checked against the layout that config
implies (missing and unexpected keys are listed) -> renamed / transposed into the parameter
names of ``llip_scale.model`` -> shapes checked against our model -> our state dict.

Accepted layout (the release's ``CMP`` model; N counts blocks; w/tw: vision/text width):

=====================================================  ==============================================
official name [shape], how it is applied               ours
=====================================================  ==============================================
visual.conv1.weight [w, 3, p, p]                       visual.conv1.weight
visual.class_embedding [K, w] (or [w] when K = 1)      visual.mixture_tokens [K, w]
visual.positional_embedding [grid^2 + K, w]            visual.positional_embedding
visual.ln_pre.*, visual.ln_post.*                      visual.ln_pre.*, visual.ln_post.*
visual.transformer.resblocks.N.ln_1.*, .ln_2.*         visual.transformer.resblocks.N.ln_1.*, .ln_2.*
  .attn.in_proj_weight [3w, w], .attn.in_proj_bias     .attn.in_proj.weight, .attn.in_proj.bias
  (nn.MultiheadAttention: fused q, k, v rows)
  .attn.out_proj.weight, .attn.out_proj.bias           .attn.out_proj.weight, .attn.out_proj.bias
  .mlp.c_fc.*, .mlp.c_proj.*                           .mlp.c_fc.*, .mlp.c_proj.*
token_embedding.weight [V, tw]                         text.token_embedding.weight
positional_embedding [L, tw]                           text.positional_embedding
transformer.resblocks.N.* (as the vision blocks)       text.transformer.resblocks.N.*
ln_final.*                                             text.ln_final.*
text_projection [tw, E], h @ P                         text_projection.weight [E, tw] (transposed)
q_proj [tw, E], h @ P                                  q_proj.weight [E, tw] (transposed)
k_proj, v_proj [K, w, E], s[:, k] @ P[k]               image_proj.k_proj, image_proj.v_proj
  (K + grid^2 rows with ``pass_all_tokens``)             (``vision.all_tokens``)
K_norm.*, V_norm.*, Q_norm.* (LayerNorm over E;        image_proj.k_norm.*, image_proj.v_norm.*,
  only with use_norm)                                  q_norm.*
pred.out_proj [E, E], z @ P, no bias                   head.out_proj [E, E]
  (also accepted: ``out_proj``, the name in early checkpoints, and an nn.Linear
  ``pred.out_proj.weight`` applied as z @ W^T, with a bias only if it is all zeros)
logit_scale [], logit_bias [] (0-dim)                  head.logit_scale [1], head.logit_bias [1]
=====================================================  ==============================================

Ignored: ``attn_mask`` (a buffer in some exports). A ``visual.proj`` means a CLIP/SigLIP
checkpoint of the same codebase, which is refused.

Conventions of the release that the matching config reproduces: QuickGELU activations
(``activation: quick_gelu``), PyTorch's default init of the vision blocks (``block_init:
torch``; only matters for training from scratch), LayerNorm eps 1e-5, the text pooled at its largest token id
(CLIP BPE's end token 49407; we pool at the first ``eot_id``, the same position for CLIP BPE
texts), the softmax temperature ``weight_scale`` = tau (5, and 1 at L/14; it is not stored in the
checkpoint), the text context (64 at L/14, 77 otherwise), H = 8 mixing heads, scores exp(logit_scale) * cos(z, t) + logit_bias.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from llip_scale.config import ConfigError, load_config
from llip_scale.model import ModelConfig, build_model

# Every released Llip size, and the "all tokens" variant; detect_config matches shapes among them.
OFFICIAL_CONFIGS = ("official/llip_b32_k64", "official/llip_b16_k32", "official/llip_l14_k32",
                    "official/llip_h14_k64", "official/llip_g14_k64", "official/llip_b32_k64_alltokens")
PREFIXES = ("module.", "_orig_mod.")
IGNORED = ("attn_mask",)
StateDict = dict[str, Tensor]
Transform = Optional[Callable[[Tensor], Tensor]]


class OfficialCheckpointError(ValueError):
    """The checkpoint is not in the official Llip layout, or does not fit the config."""


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _one_element(t: Tensor) -> Tensor:
    """The release's 0-dim logit scale / bias as our shape [1] (other shapes stay as they are, for
    the shape check to name)."""
    return t.reshape(1) if t.numel() == 1 else t


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_checkpoint(path: Union[str, Path]) -> StateDict:
    """The state dict of an official checkpoint file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"checkpoint '{path}' not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OfficialCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint of tensors "
                                      f"({str(e).splitlines()[0]})") from None
    return unwrap(obj)


def unwrap(obj: Any) -> StateDict:
    """The model state dict of a training checkpoint dict or a bare state dict, prefixes removed."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise OfficialCheckpointError("expected a state dict of tensors, or a dict with one under 'state_dict'")
    return {_strip(k): v for k, v in sd.items()}

def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _fold_aliases(sd: StateDict) -> StateDict:
    """Early names and variants onto the release's names."""
    sd = dict(sd)
    if "out_proj" in sd and "pred.out_proj" not in sd:
        sd["pred.out_proj"] = sd.pop("out_proj")
    if "pred.out_proj.weight" in sd and "pred.out_proj" not in sd:  # nn.Linear: z @ W^T (+ b)
        bias = sd.pop("pred.out_proj.bias", None)
        if bias is not None and bool(torch.any(bias != 0)):
            raise OfficialCheckpointError("pred.out_proj has a non-zero bias, which the Llip head of "
                                          "llip_scale does not have; this checkpoint cannot be imported exactly")
        sd["pred.out_proj"] = _transpose(sd.pop("pred.out_proj.weight"))
    ce = sd.get("visual.class_embedding")
    if ce is not None and ce.dim() == 1:
        sd["visual.class_embedding"] = ce[None]
    return sd


# ---------------------------------------------------------------------------------------------
# The layout a config implies
# ---------------------------------------------------------------------------------------------

def _block_keys(src: str, dst: str) -> dict[str, tuple[str, Transform]]:
    pairs = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
             "attn.in_proj_weight": "attn.in_proj.weight", "attn.in_proj_bias": "attn.in_proj.bias",
             "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
             "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
             "mlp.c_fc.weight": "mlp.c_fc.weight", "mlp.c_fc.bias": "mlp.c_fc.bias",
             "mlp.c_proj.weight": "mlp.c_proj.weight", "mlp.c_proj.bias": "mlp.c_proj.bias"}
    return {f"{src}.{a}": (f"{dst}.{b}", None) for a, b in pairs.items()}


def key_map(cfg: ModelConfig) -> dict[str, tuple[str, Transform]]:
    """official name -> (our name, transform) for every tensor of a Llip model of ``cfg``."""
    if cfg.head.kind != "llip":
        raise ConfigError(f"model.head.kind must be 'llip' to import an official Llip checkpoint, got "
                          f"'{cfg.head.kind}'")
    m: dict[str, tuple[str, Transform]] = {}
    plain = lambda *names: {n: (o, None) for n, o in names}  # noqa: E731
    m.update(plain(("visual.conv1.weight", "visual.conv1.weight"),
                   ("visual.class_embedding", "visual.mixture_tokens"),
                   ("visual.positional_embedding", "visual.positional_embedding")))
    for ln in ("ln_pre", "ln_post"):
        m.update(plain((f"visual.{ln}.weight", f"visual.{ln}.weight"), (f"visual.{ln}.bias", f"visual.{ln}.bias")))
    for i in range(cfg.vision.depth):
        m.update(_block_keys(f"visual.transformer.resblocks.{i}", f"visual.transformer.resblocks.{i}"))
    m.update(plain(("token_embedding.weight", "text.token_embedding.weight"),
                   ("positional_embedding", "text.positional_embedding"),
                   ("ln_final.weight", "text.ln_final.weight"), ("ln_final.bias", "text.ln_final.bias")))
    for i in range(cfg.text.depth):
        m.update(_block_keys(f"transformer.resblocks.{i}", f"text.transformer.resblocks.{i}"))
    m["text_projection"] = ("text_projection.weight", _transpose)
    m["q_proj"] = ("q_proj.weight", _transpose)
    m.update(plain(("k_proj", "image_proj.k_proj"), ("v_proj", "image_proj.v_proj"),
                   ("pred.out_proj", "head.out_proj")))
    m["logit_scale"] = ("head.logit_scale", _one_element)
    m["logit_bias"] = ("head.logit_bias", _one_element)
    if cfg.head.use_norm:
        for src, dst in (("K_norm", "image_proj.k_norm"), ("V_norm", "image_proj.v_norm"), ("Q_norm", "q_norm")):
            m.update(plain((f"{src}.weight", f"{dst}.weight"), (f"{src}.bias", f"{dst}.bias")))
    return m


def describe(sd: StateDict) -> dict[str, Any]:
    """The architecture an official state dict implies (shapes only)."""
    def count(prefix: str) -> int:
        blocks = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
        return len(blocks)

    def shape(key: str, dim: int) -> Optional[int]:
        t = sd.get(key)
        return int(t.shape[dim]) if t is not None and t.dim() > dim else None

    return {"vision_width": shape("visual.conv1.weight", 0), "patch_size": shape("visual.conv1.weight", 2),
            "vision_depth": count("visual.transformer.resblocks."), "num_tokens": shape("visual.class_embedding", 0),
            "positions": shape("visual.positional_embedding", 0), "mixed_tokens": shape("k_proj", 0),
            "vision_mlp": shape("visual.transformer.resblocks.0.mlp.c_fc.weight", 0),
            "text_width": shape("ln_final.weight", 0), "text_depth": count("transformer.resblocks."),
            "text_mlp": shape("transformer.resblocks.0.mlp.c_fc.weight", 0), "embed_dim": shape("text_projection", 1),
            "vocab_size": shape("token_embedding.weight", 0), "context_length": shape("positional_embedding", 0),
            "use_norm": "K_norm.weight" in sd}


def _implied(cfg: ModelConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    return {"vision_width": v.width, "patch_size": v.patch_size, "vision_depth": v.depth,
            "num_tokens": v.num_tokens, "positions": v.grid ** 2 + v.num_tokens, "mixed_tokens": v.num_outputs,
            "vision_mlp": v.mlp_dim, "text_width": t.width, "text_depth": t.depth, "text_mlp": t.mlp_dim,
            "embed_dim": cfg.head.embed_dim, "vocab_size": t.vocab_size, "context_length": t.context_length,
            "use_norm": cfg.head.use_norm}


def detect_config(sd: StateDict) -> ModelConfig:
    """The official config whose architecture the state dict has."""
    found = describe(sd)
    for name in OFFICIAL_CONFIGS:
        cfg = load_config(name).model
        if _implied(cfg) == found:
            return cfg
    shown = ", ".join(f"{k}={v}" for k, v in found.items())
    raise OfficialCheckpointError(f"the checkpoint ({shown}) matches none of {', '.join(OFFICIAL_CONFIGS)}; "
                                  "pass a config whose model section has these shapes (--config)")


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def _listing(keys: set[str], limit: int = 6) -> str:
    ordered = sorted(keys)
    more = f", ... ({len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def _check_keys(sd: StateDict, expected: dict, cfg: ModelConfig) -> None:
    present = {k for k in sd if k not in IGNORED}
    missing, unexpected = set(expected) - present, present - set(expected)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    hint = "check that the config matches the checkpoint (depths, use_norm)"
    if "visual.proj" in unexpected:
        hint = "visual.proj marks a CLIP/SigLIP checkpoint; only Llip (CMP) checkpoints can be imported"
    elif any(k.startswith(("K_norm", "Q_norm", "V_norm")) for k in missing | unexpected):
        has = "has" if "K_norm.weight" in sd else "lacks"
        hint = f"the checkpoint {has} K/Q/V LayerNorms: set model.head.use_norm accordingly"
    raise OfficialCheckpointError(f"not the official Llip layout for model '{cfg.name}' ({'; '.join(parts)}); {hint}")


def convert_state_dict(official: StateDict, cfg: Optional[ModelConfig] = None,
                       dtype: Optional[torch.dtype] = None) -> tuple[StateDict, ModelConfig]:
    """Our state dict (names of ``llip_scale.model``) and its config from an official one.

    ``cfg`` None detects the official config from the shapes. ``dtype`` casts floating tensors.
    """
    sd = _fold_aliases({_strip(k): v for k, v in official.items()})
    cfg = cfg or detect_config(sd)
    mapping = key_map(cfg)
    _check_keys(sd, mapping, cfg)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    out: StateDict = OrderedDict()
    mismatched = []
    for src, (dst, transform) in mapping.items():
        t = sd[src]
        t = transform(t) if transform else t
        if tuple(t.shape) != shapes[dst]:
            mismatched.append(f"{src} {tuple(sd[src].shape)} -> {dst} needs {shapes[dst]}")
            continue
        out[dst] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if mismatched:
        raise OfficialCheckpointError(f"shapes do not fit model '{cfg.name}': {'; '.join(mismatched[:4])}"
                                      f"{' ...' if len(mismatched) > 4 else ''}; fix the config's sizes")
    missing_ours = set(shapes) - set(out)
    if missing_ours:  # a parameter of our model that no official tensor fills
        raise OfficialCheckpointError(f"model '{cfg.name}' has parameters the layout does not fill: "
                                      f"{_listing(missing_ours)}")
    return OrderedDict((k, out[k]) for k in shapes), cfg


def import_checkpoint(path: Union[str, Path], cfg: Optional[ModelConfig] = None,
                      dtype: Optional[torch.dtype] = None) -> tuple[StateDict, ModelConfig]:
    """Read and convert an official checkpoint file."""
    return convert_state_dict(read_checkpoint(path), cfg, dtype)
