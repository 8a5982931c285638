"""pyproject.toml: the runtime needs no torch, torch is pinned, exactly one onnxruntime per platform."""

from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra brings tomli, tomllib's original
    import tomli as tomllib
from packaging.requirements import Requirement

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("platform,machine,expected", [
    ("linux", "x86_64", "onnxruntime-gpu"), ("win32", "AMD64", "onnxruntime-gpu"),
    ("linux", "aarch64", "onnxruntime"), ("darwin", "x86_64", "onnxruntime"), ("darwin", "arm64", "onnxruntime"),
])
def test_exactly_one_onnxruntime_per_platform(platform, machine, expected):
    env = {"sys_platform": platform, "platform_machine": machine}
    chosen = [r.name for r in map(Requirement, PROJECT["dependencies"])
              if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))]
    assert chosen == [expected]


def test_torch_only_in_the_train_extra_and_pinned():
    assert not any(Requirement(d).name == "torch" for d in PROJECT["dependencies"])
    torch_reqs = [Requirement(d) for d in PROJECT["optional-dependencies"]["train"] if Requirement(d).name == "torch"]
    assert [str(r.specifier) for r in torch_reqs] == ["==2.13.0"]
    assert PROJECT["scripts"]["stmae-edge"] == "stmae_edge.cli:main"
