"""open_clip-style entry points: a model name or path -> (model, preprocess_train, preprocess_val),
and the tokenizer that goes with it.

    model, preprocess_train, preprocess_val = llip_scale.create_model_and_transforms("OUT_DIR")
    tokenizer = llip_scale.get_tokenizer("OUT_DIR")
    scores = model.score(torch.stack([preprocess_val(image)]), tokenizer(["a cat", "a dog"]))

``name_or_path`` resolves to a :class:`ModelSource` (a model config, the weights when trained, the
run config, and the ``inference.yaml`` an export carries):

* a named size (``configs/models``: ``tiny``, ``b32`` ... ``g14``), a packaged config
  (``official/llip_b16_k32``, ``experiments/siglip_b16``) or a config file -> a freshly
  initialised model;
* an exported or imported folder (``model.safetensors`` + ``config.yaml``) or its
  ``.safetensors`` file;
* a run folder (its newest complete checkpoint) or a ``checkpoints/step_*`` folder of any ZeRO
  stage (consolidated in memory, nothing written);
* an official Llip checkpoint (``.pt``, converted by :mod:`llip_scale.interop.official`).

The model is built, loaded, cast to ``precision``, moved to ``device`` and put in eval mode.
The transforms come from the model's image size (and the run's crop scale). The tokenizer is,
in this order: the one an export names in ``inference.yaml``; the run's sentencepiece model
(``data.tokenizer``) or synthetic tokenizer; CLIP BPE (the packaged vocabulary) for a model
with CLIP's vocabulary (49,408 ids, end token 49,407).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml
from safetensors.torch import load_file

from llip_scale.checkpoints.deepspeed_io import consolidated_state_dict
from llip_scale.checkpoints.store import find_checkpoint, first_problem
from llip_scale.config import load_config
from llip_scale.data.config import DataConfig
from llip_scale.data.synthetic import SyntheticTokenizer
from llip_scale.data.transforms import OPENAI_MEAN, OPENAI_STD, EvalTransform, TrainTransform
from llip_scale.errors import ConfigError, from_dict, validate_tree
from llip_scale.interop import official
from llip_scale.interop.tokenizers import build_tokenizer, is_clip_vocabulary
from llip_scale.model import ContrastiveModel, ModelConfig, build_model, model_config, model_names

PathLike = Union[str, os.PathLike]
INFERENCE_FILE = "inference.yaml"  # tokenizer + preprocessing, written next to an export
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSource:
    """What ``name_or_path`` stands for."""

    model: ModelConfig
    state: Optional[Callable[[], dict]] = None  # None: a fresh model
    run: dict = field(default_factory=dict)  # the config.yaml next to the weights, as written
    inference: dict = field(default_factory=dict)  # an export's inference.yaml
    folder: Optional[Path] = None
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Resolving a name or a path
# ---------------------------------------------------------------------------------------------

def _model_config(data: dict, where: str) -> ModelConfig:
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{where} has no 'model' section; re-export the model")
    cfg = from_dict(ModelConfig, data["model"], "model")
    validate_tree(cfg, "model")
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _export_source(folder: Path, weights: Path) -> ModelSource:
    config = folder / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{weights} has no config.yaml next to it; export the model with tools/export_checkpoint.py")
    run = _read_yaml(config)
    return ModelSource(_model_config(run, str(config)), lambda: load_file(str(weights), device="cpu"), run,
                  _read_yaml(folder / INFERENCE_FILE), folder, f"export {folder}")


def _checkpoint_source(path: Path) -> Optional[ModelSource]:
    ckpt = find_checkpoint(path)
    if ckpt is None:
        return None
    why = first_problem(ckpt)
    if why is not None:
        raise ConfigError(f"checkpoint {ckpt} cannot be loaded: {why}; pass another checkpoint")

    def state() -> dict:
        return consolidated_state_dict(ckpt)

    run = _read_yaml(ckpt / "config.yaml")
    return ModelSource(_model_config(run, str(ckpt / "config.yaml")), state, run, {}, path, f"checkpoint {ckpt}")


def _official_source(path: Path, cfg: Optional[ModelConfig] = None) -> ModelSource:
    try:
        state, cfg = official.import_checkpoint(path, cfg)  # renames and transposes; memory-mapped
    except official.OfficialCheckpointError as e:
        raise ConfigError(f"{path}: {e}") from None
    return ModelSource(cfg, lambda: state, {}, {}, path.parent, f"official checkpoint {path}")


def _path_source(path: Path, model: Optional[ModelConfig] = None) -> ModelSource:
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):  # a config file: a fresh model of its architecture
            return _name_source(str(path))
        if path.suffix == ".safetensors":
            return _export_source(path.parent, path)
        return _official_source(path, model)
    if (path / "model.safetensors").is_file():
        return _export_source(path, path / "model.safetensors")
    found = _checkpoint_source(path)
    if found is None:
        raise ConfigError(f"{path} holds no model.safetensors and no complete checkpoint; pass an export, a run "
                          "folder, a checkpoints/step_* folder or an official .pt checkpoint")
    return found


def _name_source(name: str) -> ModelSource:
    if name.lower().replace("/", "") in model_names():
        return ModelSource(model_config(name), description=f"model '{name}'")
    try:
        run = load_config(name)
    except (ConfigError, OSError):
        raise ConfigError(f"'{name}' is neither an existing path nor a known model; pass one of "
                          f"{', '.join(model_names())}, a packaged config such as official/llip_b16_k32, or an "
                          "export, run, checkpoint or official .pt path") from None

    return ModelSource(run.model, run=asdict(run), description=f"config '{name}'")


def resolve(name_or_path: PathLike, model: Optional[ModelConfig] = None) -> ModelSource:
    """The :class:`ModelSource` behind a name or path (see the module docstring). ``model``: the
    architecture an official checkpoint is read as (default: detected among the releases)."""
    path = Path(name_or_path)
    return _path_source(path, model) if path.exists() else _name_source(str(name_or_path))


# ---------------------------------------------------------------------------------------------
# Models and transforms
# ---------------------------------------------------------------------------------------------

def _dtype(precision: Optional[str]) -> torch.dtype:
    key = precision or "fp32"
    if key not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def _load(model: ContrastiveModel, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
        raise ConfigError(f"the weights of {what} do not fit model '{model.cfg.name}' ({first}); pass "
                          "the matching model name, or no name") from None


def _create(source: ModelSource, pretrained: Optional[PathLike], device: Union[str, torch.device, None],
            precision: Optional[str], backend: str, chunk_size: Optional[int]) -> ContrastiveModel:
    dtype = _dtype(precision)
    model = build_model(source.model, backend, chunk_size)
    weights = resolve(pretrained, source.model) if pretrained is not None else source
    if weights.state is not None:
        _load(model, weights.state(), weights.description)
    return model.to(device=device or "cpu", dtype=dtype).eval()


def create_model(name_or_path: PathLike, pretrained: Optional[PathLike] = None,
                 device: Union[str, torch.device, None] = None, precision: Optional[str] = None,
                 backend: str = "auto", chunk_size: Optional[int] = None) -> ContrastiveModel:
    """The model of a name (fresh) or path (trained), in eval mode.

    ``pretrained``: a path whose weights are loaded into the architecture of ``name_or_path``.
    ``precision``: ``fp32`` (default), ``bf16`` or ``fp16``. ``backend``: the pair backend
    (``auto``, ``chunked``, ``triton``, ``reference``).
    """
    return _create(resolve(name_or_path), pretrained, device, precision, backend, chunk_size)


def preprocess_config(source: ModelSource) -> dict:
    """Image size and crops of a source: the export's ``inference.yaml``, else model and run."""

    saved = source.inference.get("preprocess", {})
    scale = saved.get("train_crop_scale") or source.run.get("data", {}).get("crop_scale") or DataConfig().crop_scale
    return {"image_size": int(saved.get("image_size", source.model.vision.image_size)),
            "train_crop_scale": [float(x) for x in scale]}


def create_model_and_transforms(name_or_path: PathLike, pretrained: Optional[PathLike] = None,
                                device: Union[str, torch.device, None] = None, precision: Optional[str] = None,
                                backend: str = "auto",
                                ) -> tuple[ContrastiveModel, Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(model, preprocess_train, preprocess_val)`` as in open_clip; see :func:`create_model`.

    The transforms take a PIL image (or encoded bytes) and return float32 ``[3, S, S]``: training
    is the loader's RandomResizedCrop, evaluation resizes the short side and center-crops.
    """

    source = resolve(name_or_path)
    model = _create(source, pretrained, device, precision, backend, None)
    pre = preprocess_config(source)
    return (model, TrainTransform(pre["image_size"], pre["train_crop_scale"]), EvalTransform(pre["image_size"]))


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def _file_tokenizer(path: Path, context_length: int) -> Any:
    if path.suffix == ".model":
        return build_tokenizer(context_length, spm_model=path)
    return build_tokenizer(context_length, bpe_vocab=path)


def tokenizer_spec(source: ModelSource) -> dict:
    """``{kind: sentencepiece | clip_bpe | synthetic, file: ...}`` for a source (see the module docstring)."""
    saved = source.inference.get("tokenizer")
    if saved:
        spec = dict(saved)
        if spec.get("file") and source.folder is not None:
            spec["file"] = str(source.folder / spec["file"])
        return spec
    data = source.run.get("data", {})
    if data.get("source") == "synthetic":
        return {"kind": "synthetic"}
    if data.get("tokenizer"):
        return {"kind": "sentencepiece", "file": str(data["tokenizer"])}
    if is_clip_vocabulary(source.model.text.vocab_size, source.model.text.eot_id):
        return {"kind": "clip_bpe"}
    raise ConfigError(f"{source.description} has its own vocabulary (vocab_size={source.model.text.vocab_size}, "
                      f"eot_id={source.model.text.eot_id}) and names no tokenizer; pass the sentencepiece model "
                      "it was trained with: get_tokenizer('tokenizer.model', context_length=...)")


def build_from_spec(spec: dict, cfg: ModelConfig, context_length: int) -> Any:
    kind = spec.get("kind")
    if kind == "synthetic":

        return SyntheticTokenizer(cfg.text.vocab_size, context_length, cfg.text.eot_id, cfg.text.pad_id)
    if kind == "clip_bpe":
        return build_tokenizer(context_length, bpe_vocab=spec.get("file"))
    if kind == "sentencepiece":
        if not Path(spec["file"]).is_file():
            raise ConfigError(f"tokenizer '{spec['file']}' not found (a run's data.tokenizer is relative to the "
                              "folder training ran in); run from there or pass the .model file to get_tokenizer")
        return build_tokenizer(context_length, spm_model=spec["file"])
    raise ConfigError(f"unknown tokenizer kind '{kind}' in {INFERENCE_FILE}; expected sentencepiece, clip_bpe or synthetic")


def get_tokenizer(name_or_path: PathLike, context_length: Optional[int] = None) -> Any:
    """A callable ``texts -> LongTensor [N, context_length]`` for a model name or path, or for a
    tokenizer file (a sentencepiece ``.model``, or CLIP BPE merges ``.txt.gz``).

    ``context_length`` defaults to the model's (77 for a bare tokenizer file). Both
    ``llip_scale.data.Tokenizer`` and ``llip_scale.interop.tokenizers.build_tokenizer`` objects come out
    of here; they share the layout: pieces, the end token (always kept), padding.
    """
    path = Path(name_or_path)
    if path.is_file() and path.suffix in (".model", ".gz", ".txt"):
        return _file_tokenizer(path, context_length or 77)
    source = resolve(name_or_path)
    return build_from_spec(tokenizer_spec(source), source.model, context_length or source.model.text.context_length)


# ---------------------------------------------------------------------------------------------
# Bundling an export
# ---------------------------------------------------------------------------------------------

def bundle_spec(source: ModelSource, tokenizer: Optional[PathLike] = None) -> dict:
    """The tokenizer an export of ``source`` carries (``tokenizer`` overrides the source's),
    checked by loading it: a ConfigError names the problem before anything is written."""
    if tokenizer is not None:
        kind = "sentencepiece" if Path(tokenizer).suffix == ".model" else "clip_bpe"
        spec = {"kind": kind, "file": str(tokenizer)}
        if not Path(tokenizer).is_file():
            raise ConfigError(f"tokenizer '{tokenizer}' not found; pass a sentencepiece .model or CLIP BPE merges file")
    else:
        spec = tokenizer_spec(source)
    build_from_spec(spec, source.model, source.model.text.context_length)
    return spec


def write_inference_file(out_dir: PathLike, source: ModelSource, tokenizer: Optional[PathLike] = None,
                         require_tokenizer: bool = True) -> Path:
    """Write ``out_dir/inference.yaml`` (tokenizer + preprocessing) and copy the tokenizer file
    there, so that the folder alone loads with :func:`create_model_and_transforms` and
    :func:`get_tokenizer`. ``tokenizer``: a sentencepiece ``.model`` or CLIP merges file that
    overrides the one the source names; ``require_tokenizer`` False: a source without one gets
    the preprocessing only."""

    out = Path(out_dir)
    try:
        spec: Optional[dict] = bundle_spec(source, tokenizer)
    except ConfigError:
        if require_tokenizer or tokenizer is not None:
            raise
        spec = None
    bundle: dict[str, Any] = {}
    if spec is not None:
        if spec.get("file"):
            name = "tokenizer.model" if spec["kind"] == "sentencepiece" else Path(spec["file"]).name
            if Path(spec["file"]).resolve() != (out / name).resolve():
                shutil.copyfile(spec["file"], out / name)
            spec = {"kind": spec["kind"], "file": name}
        bundle["tokenizer"] = {**spec, "context_length": source.model.text.context_length}
    bundle["preprocess"] = {**preprocess_config(source), "resize": "shortest side, bicubic", "crop": "center",
                            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
    path = out / INFERENCE_FILE
    path.write_text(yaml.safe_dump(bundle, sort_keys=False))
    return path
