"""The deployment files in deploy/ stay true: the systemd unit passes
``systemd-analyze verify`` (with its paths pointed at this checkout), the
Kubernetes manifests parse, and every MODELFLEET_* variable and serve option
they name is one modelfleet reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "modelfleet.service"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _known_variables() -> set[str]:
    source = "\n".join(p.read_text() for p in (ROOT / "modelfleet").rglob("*.py"))
    return set(re.findall(r"MODELFLEET_[A-Z0-9_]+", source))


def _serve_options() -> str:
    return subprocess.run([sys.executable, "-m", "modelfleet", "serve", "--help"],
                          capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "modelfleet"
    unit = UNIT.read_text().replace("/opt/modelfleet/.venv/bin/modelfleet", str(binary))
    copy = tmp_path / "modelfleet.service"
    copy.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "modelfleet.service" in line]
    assert not problems, problems


def test_files_name_only_real_settings() -> None:
    known = _known_variables()
    options = _serve_options()
    for path in [UNIT, *MANIFESTS]:
        text = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        for name in re.findall(r"MODELFLEET_[A-Z0-9_]+", text):
            assert name in known, f"{path.name}: {name} is read nowhere"
        for option in re.findall(r"(?<=[\s\"])--[a-z][a-z-]+", text):
            assert option in options, f"{path.name}: serve has no {option}"


def test_manifests_parse() -> None:
    assert MANIFESTS
    kinds = {doc["kind"] for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())}
    assert {"RayCluster", "Deployment", "Service"} <= kinds
