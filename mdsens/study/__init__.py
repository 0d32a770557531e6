"""Batched parameter studies: relaxations and sensitivities over a grid of
parameters times seeds, on every device, resumable.

A study (a TOML file, see :mod:`mdsens.study.config` for the schema) names a
system builder of :mod:`mdsens.systems`, the arguments to vary (a ``[grid]``
or a list of ``[[points]]``), the seeds, the minimiser and linear solver, and
named forward-mode tangents. For every sample (point x seed) it records the
relaxed positions, the energy, the sensitivity of every position to each named
tangent, the relaxed-energy gradient with respect to every parameter (envelope
theorem), and every diagnostic of the relaxation and the linear solves
(:mod:`mdsens.study.schema`). With ``[cell]`` the box relaxes too, at a
target pressure (:mod:`mdsens.cell`), and the record has the relaxed box and
its sensitivities; ``[observables] moduli = true`` adds the elastic moduli::

    from mdsens import study
    ds = study.run("data/study_example.toml", out="out/study")   # xarray.Dataset
    ds = study.load("out/study")                                 # later, or while it runs
    plan = study.Plan.from_config("data/study_example.toml")     # what it would compute

Points whose systems share one energy structure (same builder, N, dim,
species and parameter shapes; the box and diameters are parameters, so a sweep
over phi or size ratio is one group; neighbor-list systems also share their
box and list capacity) are batched together (:mod:`mdsens.study.plan`):
every device keeps ``width`` samples in flight, each relaxed by the loop of
:func:`mdsens.relax`; finished samples leave for their sensitivities and
queued ones take their slots (:mod:`mdsens.study.kernels`,
:mod:`mdsens.study.runtime`). A sample's numbers do not depend on the width,
the devices or the order of completion. Chunks are written atomically once
all their samples are done, and a killed study resumes from them
(:mod:`mdsens.study.store`).
"""

from mdsens.study.config import StudyConfig as StudyConfig
from mdsens.study.config import StudyConfigError as StudyConfigError
from mdsens.study.config import load_config as load_config
from mdsens.study.config import parse_config as parse_config
from mdsens.study.export import export as export
from mdsens.study.plan import Plan as Plan
from mdsens.study.runtime import load as load
from mdsens.study.runtime import run as run
from mdsens.study.store import StudyError as StudyError
from mdsens.study.store import StudyResumeError as StudyResumeError
