"""Config loading, overrides, validation messages, and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _train_helpers import HANG_LIMIT_S

from llip_scale.config import ConfigError, load_config, save_config
from llip_scale.model import model_names


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_and_roundtrip(tmp_path):
    cfg = load_config(None, ["model.vision.width=64", "model.vision.heads=4", "optim.lr=1e-3"])
    assert cfg.model.vision.width == 64 and cfg.optim.lr == 1e-3
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_base_includes_and_override_precedence(tmp_path):
    write(tmp_path, "model: {vision: {width: 96, heads: 4}}\nsteps: 7\n", "base.yaml")
    p = write(tmp_path, "base: base.yaml\nsteps: 9\n")
    cfg = load_config(p, ["steps=11"])
    assert cfg.model.vision.width == 96 and cfg.steps == 11
    assert load_config(p).steps == 9


def test_named_sizes_load():
    assert {"tiny", "b32", "b16", "l14", "h14", "g14"} <= set(model_names())
    cfg = load_config("models/g14.yaml")
    assert (cfg.model.vision.width, cfg.model.vision.num_tokens, cfg.model.head.use_norm) == (1664, 64, True)


@pytest.mark.parametrize("overrides, message", [
    (["model.vison.width=64"], "unknown config key 'model.vison'; did you mean 'model.vision'"),
    (["optim.lrr=1"], "did you mean 'optim.lr'"),
    (["model.vision.width=wide"], "model.vision.width: expected an integer, got 'wide'"),
    (["model.head.use_norm=3"], "model.head.use_norm: expected true or false"),
    (["model.head.embed_dim=100"], "model.head.embed_dim=100 is not divisible by model.head.num_heads=8"),
    (["model.vision.num_tokens=0"], "model.vision.num_tokens (K) must be >= 1"),
    (["model.vision.image_size=100"], "model.vision.image_size=100 is not divisible by model.vision.patch_size=16"),
    (["data.tokenizer=/nonexistent/tok.model"], "data.tokenizer: file '/nonexistent/tok.model' does not exist"),
    (["loss.backend=fast"], "loss.backend: 'fast' is not one of"),
    (["model.head.tau=0"], "model.head.tau must be > 0"),
    (["model.head.bias_init=auto"], "model.head.bias_init must be 'fixed'"),
    (["steps"], "must look like key.path=value"),
])
def test_validation_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["llip", "siglip"])
def test_batch_bias_init_starts_at_the_log_odds_of_one_positive(kind, tmp_path):
    import math

    from llip_scale.model import build_model

    cfg = load_config("models/tiny.yaml", [f"model.head.kind={kind}", "batch_size=64", "model.head.bias_init=batch"])
    assert cfg.model.head.init_logit_bias == pytest.approx(-math.log(64))
    assert build_model(cfg.model).head.logit_bias.item() == pytest.approx(-math.log(64), abs=1e-6)
    save_config(cfg, tmp_path / "saved.yaml")  # reloads to the same value, whatever batch it names
    again = load_config(tmp_path / "saved.yaml")
    assert again.model.head.init_logit_bias == cfg.model.head.init_logit_bias
    fixed = load_config("models/tiny.yaml", [f"model.head.kind={kind}", "batch_size=64"])
    assert fixed.model.head.init_logit_bias == -10.0


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llip_scale.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)


def test_cli_prints_resolved_config_and_reports_errors_in_one_line(tmp_path):
    ok = run_cli("models/tiny.yaml", "steps=3", "--print-config", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["steps"] == 3 and printed["model"]["name"] == "tiny"
    bad = run_cli("models/tiny.yaml", "model.head.num_heads=3", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "not divisible by model.head.num_heads=3" in bad.stderr
    assert not (tmp_path / "runs").exists()  # nothing written before the config is valid
