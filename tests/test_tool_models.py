"""tools/model_summary.py and tools/plan_memory.py take the same MODEL/CONFIG arguments: a named
size or a config file; anything else is one line on stderr and exit status 2."""
import importlib.util
import json

import pytest
from _train_helpers import REPO


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary():
    return _tool("model_summary")


@pytest.fixture(scope="module")
def planner():
    return _tool("plan_memory")


def test_model_summary_takes_a_name_or_a_config(summary, capsys):
    assert summary.main(["b16", str(REPO / "configs/experiments/llip_b16.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"b16", "llip_b16"}
    assert rows["b16"] == rows["llip_b16"]  # the experiment config trains the b16 size
    assert summary.main(["official/llip_l14_k32", "--json"]) == 0  # a packaged config's name
    assert json.loads(capsys.readouterr().out)["llip_l14_k32"]["K"] == 32


def test_plan_memory_takes_a_name_or_a_config(planner, capsys):
    assert planner.main(["g14", str(REPO / "configs/experiments/llip_g14.yaml"), "--world-size", "256", "--json"]) == 0
    by_name, by_path = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert by_name["config"] == "experiments/llip_g14.yaml"
    assert {k: v for k, v in by_name.items() if k != "config"} == {k: v for k, v in by_path.items() if k != "config"}
    assert planner.main(["tiny", "--json"]) == 0  # a size without an experiment config: the size alone
    assert json.loads(capsys.readouterr().out)["config"] == "models/tiny.yaml"


@pytest.mark.parametrize("tool", ["model_summary", "plan_memory"])
def test_neither_a_name_nor_a_config_is_one_line(tool, summary, planner, capsys, tmp_path):
    main = {"model_summary": summary, "plan_memory": planner}[tool].main
    for arg in ["b17", str(tmp_path)]:
        assert main([arg]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"'{arg}' is neither a model size (b16, b32, g14, h14, l14, tiny) nor a config file" in err
