"""The installed package as users run it: from any folder, including the one holding the clone."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_works_next_to_a_folder_named_like_the_package(tmp_path):
    # `git clone ... llip_scale && python ...` from the parent folder: Python sees ./llip_scale
    # (the checkout, no __init__.py) first and would import it as an empty namespace package.
    (tmp_path / "llip_scale").mkdir()
    (tmp_path / "llip_scale" / "README.md").write_text("a checkout\n")
    code = ("import llip_scale, llip_scale.kernels, llip_scale.launchers, llip_scale.configs; "
            "from pathlib import Path; "
            "print(Path(llip_scale.__file__).resolve().parent); "
            "print(llip_scale.load_pretrained.__module__, llip_scale.get_tokenizer.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder, names = out.stdout.splitlines()
    assert Path(folder) == REPO / "llip_scale"
    assert names == "llip_scale.interop.pretrained llip_scale.interop.factory"

