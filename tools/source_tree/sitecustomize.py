"""Import llip_scale from a checkout without installing it (tools/gpu_check.sh).

With the repository root and this folder on PYTHONPATH, ``llip_scale`` comes from the checkout and
this finder maps the folders that setup.cfg's ``package_dir`` installs into the package
(``kernels/`` -> ``llip_scale.kernels``, ``launchers/``, ``configs/``), as the editable install
does. It is asked after the regular path search, so an installed package still wins where it
provides these modules; tools/gpu_check.py checks that every module comes from the checkout.
"""
import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MAPPED = {"llip_scale.kernels": "kernels", "llip_scale.launchers": "launchers", "llip_scale.configs": "configs"}


class _SourceTree(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = next((p for p in _MAPPED if name == p or name.startswith(p + ".")), None)
        if top is None:
            return None
        base = os.path.join(_ROOT, _MAPPED[top], *name[len(top) + 1:].split(".")) if name != top \
            else os.path.join(_ROOT, _MAPPED[top])
        if os.path.isfile(os.path.join(base, "__init__.py")):
            return importlib.util.spec_from_file_location(name, os.path.join(base, "__init__.py"),
                                                          submodule_search_locations=[base])
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(name, base + ".py")
        return None


if not any(type(f).__name__ == "_SourceTree" for f in sys.meta_path):
    sys.meta_path.append(_SourceTree())
