"""Checkpoint folders without an engine: completeness checks, retention, RNG state round trip.

(Saving and resuming through DeepSpeed is covered end to end in test_train_resume.py, export
in test_train_equivalence.py.)
"""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from llip_scale.checkpoints import store as checkpoint
from llip_scale.checkpoints.store import (
    MARKER,
    ResumeError,
    checksum_files,
    crc32_file,
    export,
    first_problem,
    list_checkpoints,
    owner,
    problems,
    prune,
    read_marker,
    rng_state,
    set_rng_state,
    step_tag,
    verify,
    write_marker,
)


def fake_checkpoint(run: Path, step: int, complete: bool = True, world: int = 2) -> Path:
    path = run / "checkpoints" / step_tag(step)
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x" * 100)
    (path / "train_state_rank00000.pt").write_bytes(b"y" * 10)
    if complete:
        files = {"model.pt": 100, "train_state_rank00000.pt": 10}
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": world, "files": files}))
    return path


def test_complete_checkpoint_has_no_problem(tmp_path):
    assert first_problem(fake_checkpoint(tmp_path, 10), world_size=2) is None


def test_missing_marker_means_an_interrupted_write(tmp_path):
    assert "no completion marker" in first_problem(fake_checkpoint(tmp_path, 10, complete=False))


def test_truncated_or_missing_files_are_named(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    (path / "model.pt").write_bytes(b"x" * 40)
    assert first_problem(path) == "model.pt has 40 bytes where 100 were written"
    (path / "model.pt").unlink()
    assert first_problem(path) == "model.pt is missing"


def test_unreadable_marker(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    (path / MARKER).write_text("{not json")
    assert "completion marker is unreadable" in first_problem(path)


def test_other_world_size_resumes_unless_bf16_partitions_were_written(tmp_path):
    assert first_problem(fake_checkpoint(tmp_path, 10, world=4), world_size=2) is None  # resharded
    path = fake_checkpoint(tmp_path, 20, world=4)
    name = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (path / name).write_bytes(b"z" * 10)
    marker = json.loads((path / MARKER).read_text())
    marker["files"][name] = 10
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ResumeError, match="resume only on the 4 ranks that wrote them .this run has 2.; rerun with 4"):
        first_problem(path, world_size=2)
    assert first_problem(path, world_size=4) is None


def _with_model_states(path: Path, name: str, state: dict) -> Path:
    """``path`` with one more DeepSpeed model states file, recorded in its marker."""
    torch.save(state, path / name)
    marker = json.loads((path / MARKER).read_text())
    marker["files"][name] = (path / name).stat().st_size
    (path / MARKER).write_text(json.dumps(marker))
    return path


# The two layouts DeepSpeed writes (seen in checkpoints of this trainer): stage 0 keeps the
# module's tensors, ZeRO records each parameter's shape per group (its module tensors are empty).
OLD_STAGE0 = ("mp_rank_00_model_states.pt",
              {"module": {"head.out_proj": torch.zeros(2, 2), "head.logit_scale": torch.tensor(2.6),
                          "head.logit_bias": torch.tensor(-10.0)}, "param_shapes": None})
OLD_ZERO3 = ("zero_pp_rank_0_mp_rank_00_model_states.pt",
             {"module": {"head.logit_scale": torch.empty(0)},
              "param_shapes": [{"head.out_proj": torch.Size([2, 2])},
                               {"head.logit_scale": torch.Size([]), "head.logit_bias": torch.Size([])}]})


@pytest.mark.parametrize("name,state", [OLD_STAGE0, OLD_ZERO3], ids=["stage0", "zero3"])
def test_a_checkpoint_with_0dim_logit_parameters_stops_the_resume_but_exports(tmp_path, name, state):
    """Checkpoints written while the logit scale and bias were 0-dim: a resume names the cause
    and the way out in one line; verify and export still accept them."""
    path = _with_model_states(fake_checkpoint(tmp_path, 10), name, state)
    with pytest.raises(ResumeError) as info:
        first_problem(path, world_size=2, contents=False)
    message = str(info.value)
    assert "head.logit_bias, head.logit_scale as 0-dim tensors" in message and "\n" not in message
    assert "export it (tools/export_checkpoint.py) and start a new run" in message
    assert first_problem(path) is None  # what export and verify check


def test_a_checkpoint_with_shape_1_logit_parameters_resumes(tmp_path):
    name, state = OLD_ZERO3
    shapes = [{k: torch.Size([1]) if "logit" in k else v for k, v in g.items()} for g in state["param_shapes"]]
    path = _with_model_states(fake_checkpoint(tmp_path, 10), name, {**state, "param_shapes": shapes})
    assert first_problem(path, world_size=2, contents=False) is None


def test_list_is_newest_first_and_ignores_other_names(tmp_path):
    for step in (5, 20, 10):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_0000000030.skipped").mkdir()
    (tmp_path / "checkpoints" / "zero_to_fp32.py").write_text("")
    assert [f.step for f in list_checkpoints(tmp_path)] == [20, 10, 5]
    assert list_checkpoints(tmp_path / "nothing") == []


def test_retention_keeps_the_newest_complete_ones(tmp_path):
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 35, complete=False)  # a write that died
    fake_checkpoint(tmp_path, 50, complete=False)  # newer than the current step: left alone
    removed = prune(tmp_path, keep_last=2, current=40)
    assert sorted(p.name for p in removed) == [step_tag(10), step_tag(20), step_tag(35)]
    assert [f.step for f in list_checkpoints(tmp_path)] == [50, 40, 30]


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="no completion marker"):
        export(fake_checkpoint(tmp_path, 10, complete=False), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------

def sealed_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint whose marker records sizes and CRC-32s, as a save writes it."""
    path = fake_checkpoint(run, step, complete=False)
    (path / "sub").mkdir()
    (path / "sub" / "shard.pt").write_bytes(bytes(range(256)) * 300)
    names = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())
    write_marker(path, step, 2, 3, checksum_files(path, names))
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_files_checksum_is_the_crc32_of_its_blocks_crc32s(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_BLOCK", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: blocks of 1000, 1000, 560
    (tmp_path / "f").write_bytes(data)
    blocks = b"".join(zlib.crc32(data[i:i + 1000]).to_bytes(4, "big") for i in (0, 1000, 2000))
    assert crc32_file(tmp_path / "f") == (len(data), f"{zlib.crc32(blocks):08x}")
    (tmp_path / "empty").write_bytes(b"")
    assert crc32_file(tmp_path / "empty") == (0, f"{zlib.crc32(zlib.crc32(b'').to_bytes(4, 'big')):08x}")
    for offset in (0, 999, 1000, 2559):  # a flip in any block changes the file's checksum
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        (tmp_path / "g").write_bytes(bytes(flipped))
        assert crc32_file(tmp_path / "g")[1] != crc32_file(tmp_path / "f")[1]


@pytest.mark.parametrize("name", ["model.pt", "train_state_rank00000.pt", "sub/shard.pt"])
def test_a_flipped_byte_is_named_whatever_the_file_and_position(tmp_path, name):
    path = sealed_checkpoint(tmp_path, 10)
    assert problems(path, world_size=2) == []
    size = (path / name).stat().st_size
    for offset in (0, size // 2, size - 1):
        flip_byte(path / name, offset)
        assert problems(path, world_size=2) == [
            f"{name} does not match its checksum (CRC-32 {crc32_file(path / name)[1]} read, "
            f"{read_marker(path)['crc32'][name]} written): its contents changed after the save"]
        assert problems(path, world_size=2, contents=False) == []  # sizes alone cannot see it
        flip_byte(path / name, offset)
    assert problems(path, world_size=2) == []


def test_a_flipped_byte_in_the_marker_itself_is_caught(tmp_path):
    path = sealed_checkpoint(tmp_path, 10)
    marker = path / MARKER
    good = marker.read_bytes()
    for offset in range(len(good)):
        flip_byte(marker, offset)
        found = problems(path, world_size=2)
        assert len(found) == 1 and "completion marker is unreadable" in found[0], (offset, found)
        marker.write_bytes(good)


def test_the_owner_of_a_file_is_the_rank_in_its_name():
    assert owner("zero_pp_rank_3_mp_rank_00_model_states.pt", 4) == 3
    assert owner("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 4) == 1
    assert owner("train_state_rank00002.pt", 4) == 2
    assert owner("mp_rank_00_model_states.pt", 4) == 0
    assert owner("config.yaml", 4) == 0


def test_verify_reports_each_checkpoint_of_a_run(tmp_path):
    good, bad = sealed_checkpoint(tmp_path, 10), sealed_checkpoint(tmp_path, 20)
    flip_byte(bad / "model.pt", 7)
    ok, lines = verify(tmp_path)
    assert not ok and len(lines) == 2
    assert lines[0].startswith(f"{bad}: model.pt does not match its checksum")
    assert "a resume skips this checkpoint" in lines[0]
    assert lines[1].startswith(f"{good}: ok: step 10, 2 ranks, 3 files") and "CRC-32 checksums match" in lines[1]
    assert verify(good)[0] and not verify(tmp_path / "nope")[0]
