"""Shared fixtures: each system is built, relaxed (and its relaxation compiled) once
per session."""

from __future__ import annotations

import dataclasses
import gc
import os

import jax

# mdsens refuses to run in float32 and does not switch x64 on itself; this must
# happen before any array is created.
jax.config.update("jax_enable_x64", True)
# No persistent compilation cache inside the test processes: mdsens.study.run turns
# it on process-wide, for every later program of the worker. The CLI tests run in
# subprocesses with their own cache folders and still test it.
jax.config.update("jax_enable_compilation_cache", False)

import pytest  # noqa: E402

from mdsens import RelaxResult, System, relax, systems  # noqa: E402

# Names of the session-scoped system fixtures; any_relaxed holds their FIRE results.
SYSTEM_NAMES = ("soft_sphere_2d", "soft_sphere_3d", "kob_andersen", "morse", "lj_cluster")


@dataclasses.dataclass(frozen=True)
class Relaxed:
    name: str
    system: System
    result: RelaxResult


# Every compiled XLA CPU program holds a few hundred memory maps (about 500 for a
# relaxation) until JAX's caches drop it. A worker that runs hundreds of tests
# reaches Linux's limit (vm.max_map_count, 65530 by default), and the next
# compilation aborts or segfaults inside XLA: so past this many maps, the caches
# are cleared between tests (their programs are compiled again when used again).
MEMORY_MAP_BUDGET = 30_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to keep away from
        return 0


@pytest.fixture(autouse=True)
def release_compiled_programs():
    yield
    if _memory_maps() > MEMORY_MAP_BUDGET:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """mdsens.study.run's persistent compilation cache ($MDSENS_CACHE_DIR) in a
    folder of this session, not in the user's ~/.cache."""
    saved = os.environ.get("MDSENS_CACHE_DIR")
    os.environ["MDSENS_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield os.environ["MDSENS_CACHE_DIR"]
    if saved is None:
        del os.environ["MDSENS_CACHE_DIR"]
    else:
        os.environ["MDSENS_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def soft_sphere_2d() -> System:
    # The paper's system: bidisperse (1 : 1.4) harmonic discs at phi = 0.9.
    return systems.soft_sphere_packing(128, dim=2, phi=0.9)


@pytest.fixture(scope="session")
def soft_sphere_3d() -> System:
    # Above 3D jamming (phi_J ~ 0.64) so the relaxed state has overlaps.
    return systems.soft_sphere_packing(32, dim=3, phi=0.7)


@pytest.fixture(scope="session")
def kob_andersen() -> System:
    # N >= 150 so that the box holds twice the 2.5 sigma_AA cutoff.
    return systems.kob_andersen(160)


@pytest.fixture(scope="session")
def morse() -> System:
    return systems.morse(64, dim=3, density=0.9)


@pytest.fixture(scope="session")
def lj_cluster() -> System:
    return systems.lennard_jones_cluster(13)


@pytest.fixture(scope="session", params=SYSTEM_NAMES)
def any_system(request: pytest.FixtureRequest) -> tuple[str, System]:
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def relaxed_cache() -> dict[str, RelaxResult]:
    return {}


@pytest.fixture(scope="session")
def any_relaxed(any_system: tuple[str, System], relaxed_cache: dict[str, RelaxResult]) -> Relaxed:
    """FIRE with the defaults (fmax 1e-12, the system's dt_max) from the builder's start."""
    name, system = any_system
    if name not in relaxed_cache:
        relaxed_cache[name] = relax(system)
    return Relaxed(name, system, relaxed_cache[name])
