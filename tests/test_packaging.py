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
    bring cuda-python 13, which needs a CUDA 13 driver; elsewhere it takes the newest. numpy 1 there
    comes with the package itself: the runtime alone (`pip install .`) is installed on a Jetson too."""
    env = {"sys_platform": "linux", "platform_machine": "aarch64", "platform_release": release}
    chosen = [r for r in map(Requirement, PROJECT["optional-dependencies"]["gpu"]) if r.marker is None or r.marker.evaluate(env)]
    cuda = [r for r in chosen if r.name == "cuda-python"]
    assert len(cuda) == 1 and cuda[0].specifier.contains(cuda_python)
    assert cuda[0].specifier.contains("13.0") != numpy_capped
    if numpy_capped:  # the runtime's hint names the same pin as the extra
        from stmae_edge.runtime.tensorrt_backend import JETPACK6_PIN
        assert Requirement(JETPACK6_PIN.strip('"')).specifier == cuda[0].specifier
    base = [r for r in map(Requirement, PROJECT["dependencies"]) if r.marker is None or r.marker.evaluate(env)]
    assert any(r.name == "numpy" and not r.specifier.contains("2.0") for r in base) == numpy_capped


@pytest.mark.parametrize("platform,machine,release", [
    ("darwin", "arm64", "24.1.0"), ("darwin", "x86_64", "23.6.0")])
def test_the_gpu_extra_asks_nothing_of_a_mac(platform, machine, release):
    """cuda-python has no macOS wheel (its cuda-bindings neither), so asking for it there failed the
    install of scripts/test.sh, which takes the gpu extra everywhere, before any test ran."""
    env = {"sys_platform": platform, "platform_machine": machine, "platform_release": release}
    assert [r.name for r in map(Requirement, PROJECT["optional-dependencies"]["gpu"])
            if r.marker is None or r.marker.evaluate(env)] == []


def test_dependency_floors_that_pip_keeps_are_ones_that_work():
    """pip keeps an installed package that meets the floor: OpenCV before 4.10.0.84 fails to import beside
    the numpy 2 that onnx brings, and typer before 0.18 fails every command with today's click."""
    floors = {r.name: r.specifier for r in map(Requirement, PROJECT["dependencies"])}
    assert not floors["opencv-python-headless"].contains("4.9.0.80") and floors["opencv-python-headless"].contains("4.10.0.84")
    assert not floors["typer"].contains("0.17.4") and floors["typer"].contains("0.18.0")


def test_the_wheel_runs_from_any_folder_with_nothing_of_the_repository(tiny_export, synthetic_dataset, tmp_path):
    """Users install the wheel and run from their own folder: it must carry everything the commands read
    (py.typed for type checkers too), its version must be the one models record, and no test or run
    folder may ride along."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from stmae_edge import __version__

    repo, source = Path(__file__).resolve().parents[1], tmp_path / "source"
    # built from a copy: setuptools leaves build/ in the folder it builds, whose stale files later wheels take
    shutil.copytree(repo / "stmae_edge", source / "stmae_edge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(repo / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("stmae_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "stmae_edge/py.typed" in names and f"stmae_edge-{__version__}.dist-info/METADATA" in names
    # the licence pyproject.toml names, its text with the wheel (Apache-2.0 asks it of every copy)
    assert "Apache License" in zipfile.ZipFile(wheel).read(f"stmae_edge-{__version__}.dist-info/licenses/LICENSE").decode()
    assert all(name.startswith(("stmae_edge/", "stmae_edge-")) for name in names), names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    work = tmp_path / "work"
    work.mkdir()
    script = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import stmae_edge, stmae_edge.cli as cli; "
              "assert stmae_edge.__file__.startswith(sys.path[0]), stmae_edge.__file__; "
              "sys.argv = ['stmae-edge', *sys.argv[1:]]; cli.main()")
    run = lambda *args: subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300, cwd=work)
    version = run("--version")
    assert version.returncode == 0 and __version__ in version.stdout, version.stderr
    scored = run("predict", str(tiny_export[1]), str(synthetic_dataset / "test" / "good"), "--no-overlays")
    assert scored.returncode == 0 and (work / "predictions" / "results.json").is_file(), scored.stderr


def test_every_install_hint_names_an_extra_that_brings_the_package():
    """Hints are written where each error is raised (`pip install "stmae-edge[gpu]"`); an extra renamed
    in pyproject.toml would leave them pointing at nothing."""
    import re

    from stmae_edge.cli import OPTIONAL_PACKAGES

    extras = PROJECT["optional-dependencies"]
    package = Path(__file__).resolve().parents[1] / "stmae_edge"
    named = {(path.name, extra) for path in package.rglob("*.py")
             for extra in re.findall(r"stmae-edge\[([a-z-]+)\]", path.read_text())}
    assert {extra for _, extra in named} >= {"gpu", "train", "report", "demo", "serve"}
    assert all(extra in extras for _, extra in named), sorted(named)
    for module, extra in OPTIONAL_PACKAGES.items():
        requirements = [Requirement(r).name for r in extras[extra]]
        assert any(module.replace("_", "-") in name for name in requirements), (module, extra, requirements)


def test_install_hints_quote_as_every_shell_reads_them():
    """Single quotes are not quotes to Windows' cmd.exe: `pip install 'stmae-edge[gpu]'` is an invalid
    requirement there, and in `pip install 'cuda-python>=12.6,<13'` cmd reads > and < as redirections
    (pip never runs). Double quotes work in cmd, PowerShell and POSIX shells alike."""
    import re

    package = Path(__file__).resolve().parents[1] / "stmae_edge"
    single = [(path.name, hint) for path in package.rglob("*.py")  # a hint may be cut across two lines
              for hint in re.findall(r"install '[^']*'|'stmae-edge\[[^']*'|'cuda-python[^']*'", path.read_text())]
    assert not single, single
    from stmae_edge.runtime.tensorrt_backend import CUDA_PYTHON_FOR
    assert all("'" not in hint for hint in CUDA_PYTHON_FOR.values()), CUDA_PYTHON_FOR


def _repo_for_setup_env(tmp_path: Path) -> Path:
    """A copy of what scripts/setup_env.sh reads, and a bin folder that plays Git Bash on Windows:
    `python3` is the Store's stub (exit 9009), `python` the real interpreter."""
    import shutil
    import sys

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(repo / "scripts" / "setup_env.sh", work / "scripts")
    shutil.copy(repo / "pyproject.toml", work)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text("#!/bin/sh\necho 'Python was not found; run without arguments to install from "
                                   "the Microsoft Store' >&2\nexit 9009\n")
    (stubs / "python").symlink_to(sys.executable)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return work


def _installed_stamp(work: Path) -> str:
    import hashlib

    return hashlib.sha256((work / "pyproject.toml").read_bytes()).hexdigest() + " train\n"


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="plays Windows' layout with POSIX links")
def test_setup_env_takes_a_windows_venv_and_python_where_python3_is_the_store_stub(tmp_path):
    """On Windows (Git Bash, as the README names for the scripts) a venv keeps its interpreter in
    Scripts/, not bin/, and python.org's installer gives `python`, not `python3`: the script failed on
    both, saying "python3 is not Python 3.10 or later"."""
    import os
    import subprocess
    import sys

    work = _repo_for_setup_env(tmp_path)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    env.pop("STMAE_PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    # a venv as Windows lays it out: its activate script is what the script must source
    scripts = work / ".venv" / "Scripts"
    scripts.mkdir(parents=True)
    (scripts / "python.exe").symlink_to(sys.executable)
    (scripts / "activate").write_text("echo activated Scripts\n")
    (work / ".venv" / ".stmae-edge-installed").write_text(_installed_stamp(work))
    run = subprocess.run(["bash", "-c", ". scripts/setup_env.sh train && echo ready"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["activated", "Scripts", "ready"], run.stderr
    # no venv yet: it is made with `python`, the one that works
    import shutil

    shutil.rmtree(work / ".venv")
    made = tmp_path / "made-by"
    (tmp_path / "bin" / "python").unlink()
    (tmp_path / "bin" / "python").write_text(
        f"#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = venv ]; then echo python > {made}; mkdir -p .venv/bin; "
        f"ln -s {sys.executable} .venv/bin/python; echo 'echo activated bin' > .venv/bin/activate; "
        f"echo '{_installed_stamp(work).strip()}' > .venv/.stmae-edge-installed; exit 0; fi\n"
        f"exec {sys.executable} \"$@\"\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    run = subprocess.run(["bash", "-c", ". scripts/setup_env.sh train && echo ready"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["activated", "bin", "ready"], run.stderr
    assert made.read_text().strip() == "python"
