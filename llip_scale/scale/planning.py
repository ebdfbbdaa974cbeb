"""Per-GPU memory planning for a training config, and its check against a real CPU step.

Flow:
    Config + world size -> parameter statistics (model built on the meta device, nothing
    allocated) -> ZeRO settings (``distributed.*`` + ``distributed.deepspeed.zero_optimization``,
    DeepSpeed's defaults for the rest) -> per-rank bytes of
      * model states: parameters, gradients, optimizer (fp32 master + Adam moments), sharded by
        the ZeRO stage or offloaded to CPU; ZeRO-3's gathered working set and persistent params;
      * communication buffers: gradient reduce buckets, parameter all-gather buckets, the
        gathered text features of the pair loss and their gradients;
      * activations saved for backward by each tower (all block activations, or only each
        block's input with checkpointing) and by the head;
      * the pair head per backend (reference materialises Bi x Bt x (H*K + E); chunked keeps one
        block of texts alive; triton keeps per-pair scalars);
    -> peak = static + max(forward/backward phase, optimizer step phase)
    -> the largest per-GPU batch under a memory budget (bisection over the same estimate).

Activation counts follow what autograd saves in ``llip_scale.model`` (per block and token:
the block input, both LayerNorm outputs, q/k/v, the attention output, the residual, and the
MLP hidden before and after the activation; tests check them against autograd). They assume a
fused attention kernel (flash / memory-efficient on GPU, the flash kernel on CPU): no
tokens x tokens matrix is stored.

``measure_step_memory`` runs real steps (forward, backward, AdamW) on the CPU and reports the
peak resident memory above the post-import baseline; ``tools/plan_memory.py --measure`` runs
it in a fresh process so the numbers can be compared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from llip_scale.config import Config, ConfigError
from llip_scale.model import build_model
from llip_scale.model.config import ModelConfig
from llip_scale.pairs.chunked import WORKSPACE_BLOCKS, choose_mode, default_chunk, gram_blocks

GiB = float(1 << 30)
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32
# DeepSpeed's ZeRO defaults (deepspeed.runtime.zero.config), used when a key is not set.
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000, "overlap_comm": None,
    "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000, "sub_group_size": 1_000_000_000,
}
DEFAULT_GPU_RESERVE = 2.0 * GiB  # CUDA context, NCCL and cuBLAS workspaces, allocator slack


# ---------------------------------------------------------------------------------------------
# Inputs: parameters and ZeRO settings
# ---------------------------------------------------------------------------------------------

@dataclass
class ParamStats:
    total: int
    largest_tensor: int
    largest_module: int  # direct parameters of one module: what ZeRO-3 gathers at once
    numels: list[int] = field(repr=False)

    def persistent(self, threshold: int) -> int:
        """Elements ZeRO-3 keeps whole on every rank (tensors at or below the threshold)."""
        return sum(n for n in self.numels if n <= threshold)


def param_stats(cfg: ModelConfig) -> ParamStats:
    """Parameter counts of the model, built on the meta device (no memory is allocated)."""

    with torch.device("meta"):
        model = build_model(cfg)
    numels = [p.numel() for p in model.parameters()]
    per_module = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ParamStats(sum(numels), max(numels), max(per_module), numels)


@dataclass
class ZeroSettings:
    stage: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    reduce_bucket: int
    allgather_bucket: int
    prefetch_bucket: int
    max_live: int
    persistence_threshold: int
    overlap_comm: bool

    @property
    def low_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")


def zero_settings(cfg: Config) -> ZeroSettings:
    """The ZeRO knobs that size memory, read where DeepSpeed reads them."""
    d = cfg.distributed
    user = dict((d.deepspeed or {}).get("zero_optimization", {}) or {})
    _validate_zero_keys(d.zero_stage, user)
    get = lambda key: user.get(key, ZERO_DEFAULTS[key])  # noqa: E731
    overlap = get("overlap_comm")
    offload_opt = d.offload_optimizer or _offloaded(user.get("offload_optimizer"))
    offload_par = d.offload_params or _offloaded(user.get("offload_param"))
    return ZeroSettings(
        stage=d.zero_stage, precision=d.precision, offload_optimizer=offload_opt,
        offload_params=offload_par and d.zero_stage == 3,
        reduce_bucket=int(get("reduce_bucket_size")), allgather_bucket=int(get("allgather_bucket_size")),
        prefetch_bucket=int(get("stage3_prefetch_bucket_size")),
        max_live=int(get("stage3_max_live_parameters")),
        persistence_threshold=int(get("stage3_param_persistence_threshold")),
        overlap_comm=bool(d.zero_stage == 3 if overlap is None else overlap))


def _offloaded(section: Optional[dict]) -> bool:
    return bool(section) and section.get("device", "none") not in ("none", None)


def _validate_zero_keys(stage: int, zero: dict) -> None:
    """DeepSpeed forbids unknown zero_optimization keys: fail here, with the same rule."""
    try:  # lazy: the planner runs without DeepSpeed (and starts faster)
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # planning still works without DeepSpeed; the keys are just not checked
        return
    try:
        DeepSpeedZeroConfig(stage=stage, **zero)
    except Exception as e:  # pydantic's ValidationError: keep its first useful line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ConfigError(f"distributed.deepspeed.zero_optimization is not valid for DeepSpeed ({detail}); "
                          "fix the key or its value") from None


# ---------------------------------------------------------------------------------------------
# Activations (elements), per sample
# ---------------------------------------------------------------------------------------------

def block_activation_elements(tokens: int, width: int, mlp_dim: int, activation: str = "gelu") -> int:
    """Elements one transformer block saves for backward, per sample.

    x, ln_1(x), q/k/v, the attention output (fused kernels return it in the merged-heads
    layout, so merging is a view), x + attn, ln_2(.) (8 x width) and the MLP hidden before and
    after the activation (QuickGELU also keeps its sigmoid).
    """
    mlp_tensors = 3 if activation == "quick_gelu" else 2
    return tokens * (8 * width + mlp_tensors * mlp_dim)


@dataclass
class TowerActivations:
    saved: int  # kept from forward to backward
    transient: int  # extra while backpropagating through one block


def tower_activations(tokens: int, width: int, depth: int, mlp_dim: int, activation: str,
                      checkpointing: bool) -> TowerActivations:
    """Elements per sample. Backward frees each saved tensor once its consumer has run, so
    besides what is saved only one block's worth is extra: the gradients of its MLP hidden, or
    with checkpointing the block's recomputed activations and one such gradient."""
    block = block_activation_elements(tokens, width, mlp_dim, activation)
    edges = tokens * width  # the input of ln_pre (vision) or of ln_final (text)
    if checkpointing:  # only each block's input is kept; backward recomputes one block at a time
        return TowerActivations(depth * tokens * width + edges, block + tokens * mlp_dim)
    return TowerActivations(depth * block + edges, 2 * tokens * mlp_dim)


def head_activation_elements(cfg: ModelConfig) -> tuple[int, int]:
    """(per image, per text) elements the projections save: ln_post input and output of the
    K tokens, k/v (and their pre-norm values), h at the EOT token, q/t."""
    v, t, h = cfg.vision, cfg.text, cfg.head
    norm = 2 if h.use_norm else 1
    if h.kind == "llip":
        per_image = 2 * v.num_outputs * v.width + 2 * v.num_outputs * h.embed_dim * norm
        per_text = t.width + 2 * h.embed_dim + (h.embed_dim if h.use_norm else 0)
    else:
        per_image = 2 * v.num_outputs * v.width + 2 * h.embed_dim
        per_text = t.width + 2 * h.embed_dim
    return per_image, per_text


# ---------------------------------------------------------------------------------------------
# The pair head, per backend (bytes)
# ---------------------------------------------------------------------------------------------

def pair_head_bytes(cfg: ModelConfig, bi: int, bt: int, backend: str, act_bytes: int,
                    chunk_size: Optional[int] = None) -> tuple[float, float]:
    """(saved, transient) bytes of the pair computation: ``bi`` local images x ``bt`` texts."""
    h = cfg.head
    k, e, nh = cfg.vision.num_outputs, h.embed_dim, h.num_heads
    if h.kind != "llip":  # [Bi, Bt] scores in fp32, the softplus input, and their gradient
        return 2.0 * bi * bt * 4, 1.0 * bi * bt * 4
    if backend == "reference":  # attn [Bi, Bt, H, K] and mixed/z/unit z [Bi, Bt, E], then grads
        saved = float(bi) * bt * (nh * k + 3 * e) * act_bytes
        return saved, saved + float(bi) * bt * nh * k * act_bytes
    if backend == "triton":  # fused: nothing per pair x K or E; the kernel plans its own chunks
        from llip_scale.kernels.pairs import workspace_bytes  # lazy: triton is optional off CUDA
        saved = 2.0 * bi * bt * 4  # fp32 cos and ||z|| per pair, kept from the forward
        dtype = torch.float32 if act_bytes == 4 else torch.bfloat16
        return saved, workspace_bytes(bi, bt, k, e, nh, dtype) - saved

    upcast = 2 if act_bytes < 4 else 0  # bf16 keys/values get fp32 copies
    if choose_mode(k, nh, e) == "gram":
        # Kept from forward to backward: q / tau and U, unit targets, keys and values per head,
        # the folded values and G, and the gradients the fused pass computed (same sizes).
        per_text = 2 * e + e + 2 * e
        per_image = upcast * k * e + 2 * k * e + nh * k * e + 2 * (nh * k) ** 2 + 2 * k * e
        saved = 4.0 * (bt * per_text + bi * per_image)
        images, texts = gram_blocks(bi, bt, k, nh, chunk_size)
        return saved, 4.0 * WORKSPACE_BLOCKS * images * texts * nh * k
    chunk = min(bt, chunk_size or default_chunk(bi, k, nh, e, bt))
    saved = 4.0 * (bt * 2 * e + bi * upcast * k * e)  # q / tau, unit targets
    # One block of texts, forward recomputed in backward plus its gradients.
    transient = 2 * 4.0 * bi * chunk * (2 * nh * k + 3 * e)
    return saved, transient


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """Bytes per rank. ``static`` lines live all step; the peak adds the larger phase."""
    world_size: int
    micro_batch: int
    global_batch: int
    backend: str
    zero: ZeroSettings
    checkpointing: bool
    params: ParamStats
    static: dict[str, float]
    backward: dict[str, float]  # the forward/backward phase
    step: dict[str, float]  # the optimizer step phase
    cpu: dict[str, float]  # offloaded to host memory, per rank
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.static.values()) + max(sum(self.backward.values()), sum(self.step.values()))

    @property
    def activation_bytes(self) -> float:
        return sum(v for k, v in self.backward.items() if k.startswith("activations"))


def _dtype_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def _model_states(p: ParamStats, z: ZeroSettings, n: int) -> tuple[dict, dict, dict]:
    """(static, step-phase, cpu) bytes of parameters, gradients and optimizer states."""
    P = float(p.total)
    static: dict[str, float] = {}
    step: dict[str, float] = {}
    cpu: dict[str, float] = {}
    low = z.low_precision
    wbytes = 2 if low else 4
    # Parameters in the training dtype: replicated below stage 3.
    if z.stage == 3:
        shard = wbytes * P / n
        (cpu if z.offload_params else static)["parameters (shard)"] = shard
        static["parameters (persistent, whole)"] = wbytes * p.persistent(z.persistence_threshold)
        live = min(P, z.max_live + p.largest_module)
        static["parameters (gathered working set)"] = wbytes * min(live, z.prefetch_bucket + 2 * p.largest_module)
    else:
        static["parameters"] = wbytes * P
    # Gradients in the training dtype: sharded from stage 2 (DeepSpeed keeps the partition in a
    # preallocated buffer); below that the full gradients exist only during backward/step.
    if z.stage >= 2:
        static["gradients (shard)"] = wbytes * P / n
    else:
        step["gradients"] = wbytes * P
    # Optimizer: fp32 master weights (mixed precision only) and Adam moments, sharded from
    # stage 1; the step works on an fp32 copy of the (partitioned) gradients.
    opt_shard = n if z.stage >= 1 else 1
    target = cpu if z.offload_optimizer else static
    if low:
        target["optimizer: fp32 master weights"] = 4.0 * P / opt_shard
        (cpu if z.offload_optimizer else step)["optimizer: fp32 gradients"] = 4.0 * P / opt_shard
    target["optimizer: Adam moments"] = 4.0 * ADAM_STATES * P / opt_shard
    return static, step, cpu


def _comm_buffers(cfg: Config, z: ZeroSettings, n: int, bt: int, act_bytes: int) -> dict[str, float]:
    out: dict[str, float] = {}
    gbytes = 2 if z.low_precision else 4
    if n > 1 or z.stage > 0:
        out["gradient reduce buckets"] = gbytes * float(z.reduce_bucket) * (2 if z.overlap_comm else 1)
    if 0 < z.stage < 3 and n > 1:
        out["parameter all-gather bucket"] = gbytes * float(z.allgather_bucket)
    if n > 1:  # gathered features and their gradients: Llip q and t, CLIP texts and images
        width = 2 if cfg.model.head.kind in ("llip", "clip") else 1
        out["gathered text features + grads"] = 2.0 * bt * width * cfg.model.head.embed_dim * act_bytes
    return out


def _backward_phase(cfg: Config, bi: int, bt: int, backend: str, ab: int) -> dict[str, float]:
    """Bytes alive at the peak of forward/backward: saved activations plus the largest transient."""
    m, ckpt = cfg.model, cfg.distributed.activation_checkpointing
    v, t = m.vision, m.text
    vis = tower_activations(v.grid ** 2 + v.num_tokens, v.width, v.depth, v.mlp_dim, v.activation, ckpt)
    txt = tower_activations(t.context_length, t.width, t.depth, t.mlp_dim, t.activation, ckpt)
    per_image, per_text = head_activation_elements(m)
    vis_saved, txt_saved = float(bi) * vis.saved * ab, float(bi) * txt.saved * ab
    pair_saved, pair_transient = pair_head_bytes(m, bi, bt, backend, ab, cfg.loss.chunk_size)
    return {
        "activations: vision": vis_saved,
        "activations: text": txt_saved,
        "activations: head projections": float(bi) * (per_image + per_text) * ab,
        f"pair head ({backend})": pair_saved,
        # Backward runs the pair head first, then the whole text tower (its nodes are newer),
        # then the vision tower, with the text and pair activations already freed.
        "backward transient (largest)": max(pair_transient, float(bi) * txt.transient * ab,
                                            float(bi) * vis.transient * ab - txt_saved - pair_saved, 0.0),
    }


def plan_memory(cfg: Config, world_size: int, micro_batch: Optional[int] = None,
                backend: Optional[str] = None, reserve_bytes: float = DEFAULT_GPU_RESERVE,
                optimizer_transient: bool = False, params: Optional[ParamStats] = None) -> MemoryPlan:
    """Per-rank memory of one training step of ``cfg`` on ``world_size`` data-parallel ranks.

    ``micro_batch`` defaults to ``cfg.batch_size / world_size``. ``backend`` defaults to the
    config's (``auto`` means triton, the GPU path). ``optimizer_transient`` adds the per-tensor
    temporaries of PyTorch's single-tensor AdamW (the CPU path; DeepSpeed's fused Adam has none).
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if micro_batch is None:
        if cfg.batch_size % world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by world size {world_size}; "
                              "pass a per-GPU batch or another world size")
        micro_batch = cfg.batch_size // world_size
    if micro_batch < 1:
        raise ConfigError(f"per-GPU batch must be >= 1, got {micro_batch}")
    m = cfg.model
    backend = backend or cfg.loss.backend
    backend = "triton" if backend == "auto" else backend
    z = zero_settings(cfg)
    p = params or param_stats(m)
    n, bi = world_size, micro_batch
    bt = bi * n
    ab = _dtype_bytes(z.precision)

    static, step, cpu = _model_states(p, z, n)
    static.update(_comm_buffers(cfg, z, n, bt, ab))
    static["input batch"] = bi * (3 * m.vision.image_size ** 2 * ab + m.text.context_length * 8)
    backward = _backward_phase(cfg, bi, bt, backend, ab)
    if optimizer_transient:
        step["optimizer step temporaries"] = 2 * 4.0 * p.largest_tensor
    static["runtime reserve"] = float(reserve_bytes)
    notes = []
    if z.stage == 3:
        notes.append(f"ZeRO-3 keeps {p.persistent(z.persistence_threshold):,} elements in tensors of "
                     f"<= {z.persistence_threshold:,} whole on every rank; the largest module gathers "
                     f"{p.largest_module:,}")
    return MemoryPlan(n, bi, bt, backend, z, cfg.distributed.activation_checkpointing, p, static, backward,
                      step, cpu, notes)


def max_micro_batch(cfg: Config, world_size: int, budget_bytes: float, backend: Optional[str] = None,
                    reserve_bytes: float = DEFAULT_GPU_RESERVE, limit: int = 1 << 16) -> int:
    """The largest per-GPU batch whose planned peak fits ``budget_bytes`` (0 if none does)."""
    params = param_stats(cfg.model)
    fits = lambda b: plan_memory(cfg, world_size, b, backend, reserve_bytes,  # noqa: E731
                                 params=params).peak <= budget_bytes
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GiB:9.2f}"


def format_plan(plan: MemoryPlan, title: str = "", budget_bytes: Optional[float] = None,
                max_batch: Optional[int] = None) -> str:
    z = plan.zero
    lines = [title] if title else []
    lines.append(f"world size {plan.world_size}, per-GPU batch {plan.micro_batch} (global {plan.global_batch}), "
                 f"ZeRO-{z.stage} {z.precision}, activation checkpointing "
                 f"{'on' if plan.checkpointing else 'off'}, pair backend {plan.backend}")
    lines.append(f"parameters {plan.params.total / 1e6:,.1f}M (largest tensor {plan.params.largest_tensor / 1e6:.1f}M)")
    lines.append(f"{'per GPU':<44}{'GiB':>9}")
    for header, part in (("always resident", plan.static), ("forward/backward phase", plan.backward),
                         ("optimizer step phase", plan.step)):
        if not part:
            continue
        lines.append(f"  {header}")
        lines.extend(f"    {k:<40}{_gib(v)}" for k, v in part.items())
    lines.append(f"  {'peak = resident + larger phase':<42}{_gib(plan.peak)}")
    if plan.cpu:
        lines.append(f"  offloaded to CPU, per rank{'':16}{_gib(sum(plan.cpu.values()))}")
    if budget_bytes is not None:
        verdict = "fits" if plan.peak <= budget_bytes else "DOES NOT FIT"
        lines.append(f"  {verdict} in {budget_bytes / GiB:.0f} GiB; largest per-GPU batch that fits: {max_batch}")
    lines.extend(f"  note: {n}" for n in plan.notes)
    return "\n".join(lines)


def plan_as_dict(plan: MemoryPlan) -> dict:
    return {"world_size": plan.world_size, "micro_batch": plan.micro_batch, "global_batch": plan.global_batch,
            "backend": plan.backend, "zero": dataclasses.asdict(plan.zero), "checkpointing": plan.checkpointing,
            "parameters": plan.params.total, "static": plan.static, "backward": plan.backward,
            "step": plan.step, "cpu": plan.cpu, "peak": plan.peak}
