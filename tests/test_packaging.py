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


@pytest.mark.parametrize("release,cuda_python,numpy_capped", [
    ("6.8.0-45-generic", "12.6", False), ("5.15.148-tegra", "12.6", True)])
def test_the_gpu_extra_follows_jetpacks_cuda_on_a_jetson(release, cuda_python, numpy_capped):
    """On a Jetson (JetPack 6: CUDA 12.6, its Python packages built for numpy 1) the gpu extra must not
    bring cuda-python 13, which needs a CUDA 13 driver; elsewhere it takes the newest."""
    env = {"sys_platform": "linux", "platform_machine": "aarch64", "platform_release": release}
    chosen = [r for r in map(Requirement, PROJECT["optional-dependencies"]["gpu"]) if r.marker is None or r.marker.evaluate(env)]
    cuda = [r for r in chosen if r.name == "cuda-python"]
    assert len(cuda) == 1 and cuda[0].specifier.contains(cuda_python)
    assert cuda[0].specifier.contains("13.0") != numpy_capped
    assert any(r.name == "numpy" and not r.specifier.contains("2.0") for r in chosen) == numpy_capped


@pytest.mark.parametrize("platform,machine,release", [
    ("darwin", "arm64", "24.1.0"), ("darwin", "x86_64", "23.6.0")])
def test_the_gpu_extra_asks_nothing_of_a_mac(platform, machine, release):
    """cuda-python has no macOS wheel (its cuda-bindings neither), so asking for it there failed the
    install of scripts/test.sh, which takes the gpu extra everywhere, before any test ran."""
    env = {"sys_platform": platform, "platform_machine": machine, "platform_release": release}
    assert [r.name for r in map(Requirement, PROJECT["optional-dependencies"]["gpu"])
            if r.marker is None or r.marker.evaluate(env)] == []
