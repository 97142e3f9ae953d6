"""benchmarks/gpu_check.sh, the GPU check, kept from rotting on the CPU: its syntax, its package list against
pyproject.toml, the report's reading of pytest, and a dry run of the whole script on the CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def requirements() -> dict[str, str]:
    lines = (BENCH / "gpu_requirements.txt").read_text().splitlines()
    return dict(line.split() for line in lines if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


def test_package_list_covers_pyproject_beyond_what_a_cuda_box_has():
    found = requirements()
    assert all(importlib.util.find_spec(module) for module in found), "an import name that does not exist"
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in dependencies}
    listed = {re.split(r"[<>=]", r, maxsplit=1)[0].lower() for r in found.values()}
    assert names - listed == {"torch", "transformers", "peft"}
    for dependency in dependencies:  # the same pins
        name = re.split(r"[<>=\[ ;]", dependency, maxsplit=1)[0].lower()
        if name in listed:
            assert dependency.split("#")[0].strip().strip('"') in found.values(), dependency


def test_report_reads_pytest(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_check import pytest_summary
    finally:
        sys.path.remove(str(BENCH))
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
                     '<testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" name="test_b">'
                     '<failure message="no"/></testcase><testcase classname="tests.test_x" name="test_c"/>'
                     '</testsuite></testsuites>')
    summary = pytest_summary(str(junit), 1, 2.0)
    assert summary["passed"] is False and summary["failed_tests"] == ["tests.test_x::test_b"]
    assert pytest_summary(str(tmp_path / "none.xml"), 124, 210.0)["passed"] is False  # killed by its timeout
    assert pytest_summary(None, None, None) is None


def test_dry_run_on_the_cpu(tmp_path):
    """The whole script as the GPU machine runs it, on the CPU: nothing to install, one device test, tiny steps."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu", GPU_CHECK_TINY="1",
               GPU_CHECK_RESULTS=str(tmp_path / "results"), GPU_CHECK_BUDGET_S="480",
               GPU_CHECK_PYTEST_ARGS="tests/test_device_agnostic.py -k test_device_layer_equals_dense_reference")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "no-wheels")], env=env,
                          capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing missing" in proc.stdout
    result = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert result["ok"] and result["complete"] and result["environment"]["device"] == "cpu"
    assert result["tests"]["tests"] == 1 and result["tests"]["passed"]
    assert [(r["model"], r["kind"]) for r in result["rows"]] == [("tiny", "default"), ("tiny", "adapter"), ("tiny", "plain")]
    assert all(r["finite"] and r["step_s"] > 0 and len(r["step_times"]) == 3 for r in result["rows"])
    assert "Overall: PASS" in (tmp_path / "results" / "gpu_check.md").read_text()
