"""ZeRO-3 model building on the CPU: 2 ranks (torchrun, gloo, DS_ACCELERATOR=cpu) build models
under deepspeed.zero.Init through llip_scale.train.zero_init.build_model_zero3."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import HANG_LIMIT_S

from llip_scale.model import model_config
from llip_scale.scale import planning

WORKER = Path(__file__).with_name("zero3_worker.py")
# G/14 at full depth takes minutes on 2 CPU cores; the default keeps every width and the
# largest tensors (k/v projections, token embedding) with a quarter of the blocks.
G14_VISION_DEPTH = int(os.environ.get("LLIP_TEST_G14_DEPTH", "12"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, *args: str, timeout: float = HANG_LIMIT_S) -> list[dict]:
    # Pinning glibc's mmap threshold returns freed tensors to the OS, so the resident
    # high-water mark is that of live memory rather than of the heap.
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One 2-rank launch for both checks (the G/14 build only with enough free memory)."""
    tmp = tmp_path_factory.mktemp("zero3")
    checks = ["exact"]
    if _available_bytes() >= 16 * planning.GiB:
        checks += ["memory", "g14", str(G14_VISION_DEPTH)]
    return _run_ranks(tmp, str(tmp), *checks)


@pytest.mark.slow
@pytest.mark.parametrize("check,kind", [("exact", "llip"), ("exact_siglip_torch_init", "siglip")])
def test_zero_init_build_equals_plain_build(ranks, check, kind):
    """Partitioned at construction, yet value for value the model a plain build gives: every
    module draws its initial values in its own constructor, before zero.Init partitions it."""
    exact = [r[check] for r in ranks]
    total = planning.param_stats(model_config("tiny", kind=kind)).total
    assert [r["total"] for r in exact] == [total, total]
    assert all(abs(r["local"] - total / 2) <= 64 for r in exact)  # ceil(numel / 2) per tensor
    assert exact[0]["mismatched"] == []
    assert exact[0]["stds"]["text.token_embedding.weight"] == pytest.approx(0.02, rel=0.05)


@pytest.mark.slow
def test_g14_bf16_is_built_sharded_without_materialising_it(ranks):
    if "memory" not in ranks[0]:
        pytest.skip(f"building G/14 on 2 ranks needs ~16 GiB of free memory, this machine has "
                    f"{_available_bytes() / planning.GiB:.1f} GiB")
    memory = [r["memory"] for r in ranks]
    cfg = model_config("g14")
    depth = memory[0]["vision_depth"]
    cfg.vision.depth, cfg.text.depth = depth, max(1, depth * cfg.text.depth // cfg.vision.depth)
    stats = planning.param_stats(cfg)
    full_bytes = 2 * stats.total
    for r in memory:
        assert r["total"] == stats.total and r["dtypes"] == ["torch.bfloat16"]
        assert r["local"] == pytest.approx(stats.total / 2, rel=1e-3)  # each rank holds half
        shard_bytes = 2 * r["local"]
        assert r["rss_bytes"] == pytest.approx(shard_bytes, rel=0.15)  # what stays is the shard
        # The peak is the shard plus one module at a time (the largest: k_proj + v_proj,
        # 272M elements), never the whole model.
        assert r["peak_bytes"] - shard_bytes < 2.5 * 2 * stats.largest_module
        assert r["peak_bytes"] < 0.85 * full_bytes


def _available_bytes() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
