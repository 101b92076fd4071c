"""pyproject's floors are the oldest versions actually tested: the pinned set (requirements/test.txt); the
latest set (requirements/latest.txt) is at or above every floor, on the same torch."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: Version(next(iter(r.specifier)).version) for r in reqs}


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    floors = {}
    for r in map(Requirement, declared):
        (spec,) = [s for s in r.specifier if s.operator == ">="]
        floors[r.name] = Version(spec.version)
    return floors


def test_every_pinned_package_pyproject_declares_has_the_pin_as_its_floor():
    pinned, floors = _pins("test.txt"), _floors()
    shared = sorted(set(pinned) & set(floors))
    assert {"torch", "transformers", "peft", "trl", "axolotl", "datasets"} <= set(shared)
    assert {n: floors[n] for n in shared} == {n: pinned[n] for n in shared}


def test_the_latest_set_is_at_or_above_every_floor_on_the_same_torch():
    latest, pinned, floors = _pins("latest.txt"), _pins("test.txt"), _floors()
    assert latest["torch"] == pinned["torch"]
    assert {"peft", "transformers", "trl", "accelerate", "datasets"} <= set(latest) and "axolotl" not in latest
    assert all(latest[n] >= floors[n] for n in set(latest) & set(floors))


def test_the_demo_set_is_a_subset_of_the_tested_pins():
    """`scripts/demo` installs requirements/demo.txt: every pin there is the tested set's, at the same version."""
    demo, pinned = _pins("demo.txt"), _pins("test.txt")
    assert {"torch", "axolotl", "peft", "transformers", "gguf"} <= set(demo)
    assert {n: pinned.get(n) for n in demo} == demo
