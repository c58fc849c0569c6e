"""requirements/lock.txt agrees with pyproject.toml, and setup.sh installs from it with hashes.

The lock is universal (one file for Python 3.10-3.13 on Linux, macOS and Windows), so agreement is checked in each
of those environments: every requirement of the project and its extras that applies there has exactly one locked
version that applies there, and that version is in the requirement's range.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; the lock installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
TORCH_PIN = ROOT / "requirements" / "torch.txt"
UV_PIN = ROOT / "requirements" / "uv.txt"
# Not in the lock: the build differs per machine (see requirements/torch.txt).
UNLOCKED = {"torch"}
PYTHONS = ["3.10.14", "3.11.9", "3.12.8", "3.13.1"]
PLATFORMS = [("linux", "Linux", "posix"), ("darwin", "Darwin", "posix"), ("win32", "Windows", "nt")]


def environments() -> list[dict[str, str]]:
    envs = []
    for full in PYTHONS:
        for sys_platform, system, os_name in PLATFORMS:
            env = dict(default_environment())
            env.update(python_full_version=full, python_version=".".join(full.split(".")[:2]),
                       sys_platform=sys_platform, platform_system=system, os_name=os_name,
                       platform_machine="x86_64", implementation_name="cpython",
                       platform_python_implementation="CPython")
            envs.append(env)
    return envs


def parse_lock(text: str) -> list[tuple[Requirement, list[str]]]:
    """The lock's entries as (``name==version ; marker`` requirement, hashes), continuation lines joined."""
    entries = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = re.findall(r"--hash=(\S+)", line)
        spec = re.sub(r"\s*--hash=\S+", "", line).strip()
        entries.append((Requirement(spec), hashes))
    return entries


def project_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def disagreements(pyproject_text: str, lock_text: str) -> list[str]:
    """Every way the lock fails pyproject: a requirement missing or out of range, an ambiguous or unhashed entry."""
    problems = []
    entries = parse_lock(lock_text)
    for req, hashes in entries:
        spec = req.specifier
        if len(spec) != 1 or next(iter(spec)).operator != "==":
            problems.append(f"lock entry {req} is not pinned with ==")
        if not hashes:
            problems.append(f"lock entry {req} has no hash")
        if canonicalize_name(req.name) in UNLOCKED:
            problems.append(f"lock entry {req} must not be locked (its build differs per machine)")
    for env in environments():
        where = f"Python {env['python_full_version']} on {env['sys_platform']}"
        applying: dict[str, list[Requirement]] = {}
        for req, _ in entries:
            if req.marker is None or req.marker.evaluate(env):
                applying.setdefault(canonicalize_name(req.name), []).append(req)
        for name, reqs in applying.items():
            if len(reqs) > 1:
                problems.append(f"{where}: {len(reqs)} lock entries for {name}")
        for req in project_requirements(tomllib.loads(pyproject_text)):
            name = canonicalize_name(req.name)
            if name in UNLOCKED or (req.marker is not None and not req.marker.evaluate(env)):
                continue
            if name not in applying:
                problems.append(f"{where}: pyproject requires {req} but the lock has no {name}")
                continue
            version = Version(next(iter(applying[name][0].specifier)).version)
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{where}: pyproject requires {req} but the lock has {name}=={version}")
    return problems


def test_the_lock_agrees_with_pyproject():
    assert disagreements((ROOT / "pyproject.toml").read_text(), LOCK.read_text()) == []


def test_a_range_the_lock_misses_is_named():
    pyproject = (ROOT / "pyproject.toml").read_text().replace('"optuna>=3.6"', '"optuna>=99"')
    problems = disagreements(pyproject, LOCK.read_text())
    assert problems and all("optuna>=99" in p for p in problems)
    assert len(problems) == len(PYTHONS) * len(PLATFORMS)


def test_a_new_requirement_missing_from_the_lock_is_named():
    pyproject = (ROOT / "pyproject.toml").read_text().replace('"pytest>=8",', '"pytest>=8",\n  "hypothesis>=6",')
    assert any("the lock has no hypothesis" in p for p in disagreements(pyproject, LOCK.read_text()))


def test_unhashed_ambiguous_and_torch_entries_are_named():
    lock = LOCK.read_text() + "optuna==4.0.0\nrich==13.0.0 --hash=sha256:00\ntorch==2.13.0 --hash=sha256:00\n"
    problems = disagreements((ROOT / "pyproject.toml").read_text(), lock)
    assert "lock entry optuna==4.0.0 has no hash" in problems
    assert any(p.endswith("2 lock entries for rich") for p in problems)
    assert any(p.startswith("lock entry torch==2.13.0 must not be locked") for p in problems)


def test_the_lock_leaves_out_torchs_cuda_runtime_and_keeps_its_cpu_dependencies():
    names = {canonicalize_name(req.name) for req, _ in parse_lock(LOCK.read_text())}
    assert not {n for n in names if n.startswith(("nvidia-cu", "nvidia-nccl", "cuda-")) or n == "triton"}
    assert {"sympy", "networkx", "filelock", "fsspec", "jinja2", "setuptools"} <= names
    assert "flava" not in names


def test_the_torch_pin_is_in_pyprojects_range():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(r for r in project_requirements(pyproject) if r.name == "torch")
    pins = [Requirement(line) for line in TORCH_PIN.read_text().splitlines() if line and not line.startswith("#")]
    assert [p.name for p in pins] == ["torch"]
    assert torch_req.specifier.contains(next(iter(pins[0].specifier)).version)


@pytest.mark.parametrize("path", [LOCK, UV_PIN])
def test_every_entry_is_pinned_and_hashed(path):
    entries = parse_lock(path.read_text())
    assert entries and all(hashes and str(req.specifier).startswith("==") for req, hashes in entries)


def test_setup_installs_the_lock_with_hashes_before_torch_and_the_project_without_deps():
    steps = [line for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if "install" in line and not line.lstrip().startswith("#")]
    lock_step = next(i for i, s in enumerate(steps) if "requirements/lock.txt" in s)
    torch_step = next(i for i, s in enumerate(steps) if "requirements/torch.txt" in s)
    project_step = next(i for i, s in enumerate(steps) if s.rstrip().endswith("-e ."))
    assert "--require-hashes" in steps[lock_step] and "--no-deps" in steps[lock_step]
    assert "--require-hashes" in steps[0] and "requirements/uv.txt" in steps[0]
    assert lock_step < torch_step < project_step
    assert "--no-deps" in steps[project_step]
