# Written by scripts.mutation into the root of each copy of the project as sitecustomize.py, with _PACKAGES filled
# in.  The copy's root is on PYTHONPATH, so every Python process a test starts (python -m grownfx, torchrun workers,
# python -c ...) imports this first: the project's packages then come from this copy -- the one holding the
# mutant -- and never from the developer's editable install.  While the coverage map is built it also measures the
# process under the context of the test that started it.
import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
_PACKAGES = {}  # package name -> folder relative to the copy's root (filled in by scripts.mutation)
_TOPS = {name.split(".")[0] for name in _PACKAGES}


class _CopyFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] not in _TOPS:
            return None
        if name in _PACKAGES:
            folder = os.path.join(_ROOT, _PACKAGES[name])
            init = os.path.join(folder, "__init__.py")
            if os.path.exists(init):
                return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [folder]
            return spec
        parent = sys.modules.get(name.rpartition(".")[0])
        search = getattr(parent, "__path__", None)
        if search is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, list(search))
        if spec is None:  # never fall through to the developer's editable install
            raise ModuleNotFoundError(f"No module named {name!r} (in the mutation copy {_ROOT})", name=name)
        return spec


sys.meta_path.insert(0, _CopyFinder)

if os.environ.get("GROWNFX_MUTATION_COVDIR"):
    try:
        import atexit

        import coverage

        _include = [p for p in os.environ.get("GROWNFX_MUTATION_COV_INCLUDE", "").split(os.pathsep) if p]
        _cov = coverage.Coverage(data_file=os.path.join(os.environ["GROWNFX_MUTATION_COVDIR"], "subprocess.cov"),
                                 data_suffix=True, include=_include or None, config_file=False, branch=False,
                                 context=os.environ.get("GROWNFX_MUTATION_CONTEXT") or None)
        _cov.start()

        def _save():
            _cov.stop()
            _cov.save()

        atexit.register(_save)
    except Exception:  # measuring a subprocess is best effort; the test itself must run as usual
        pass
