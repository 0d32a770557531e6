"""The computations and drawings behind the notebooks' figures.

One module per figure: :mod:`~mdsens.figures.sensitivity` (a packing's
sensitivity field, the README's first figure, and three derivative methods
against the dense reference), :mod:`~mdsens.figures.precision` (the error
against minimiser iterations), :mod:`~mdsens.figures.parameter_study` (a
:mod:`mdsens.study` sweep), :mod:`~mdsens.figures.inverse_design` (a bilevel
optimisation), :mod:`~mdsens.figures.jamming_scaling` (elastic moduli near
jamming), :mod:`~mdsens.figures.jamming_pressure` (the same against pressure)
and :mod:`~mdsens.figures.vacancy` (a vacancy in silicon);
:mod:`~mdsens.figures.packing` is the packing the first two share. Each figure
module has ``SIZES`` and ``run(size, out, ...)``, which writes its PNG files to
``out`` and returns a JSON-able summary with their paths under ``"figures"``.
The notebooks call ``run``; ``scripts/figure_*.py`` are its command lines
(:func:`mdsens.figures.command_line.main`), which also write the figures'
record (:mod:`mdsens.figures.records`): the numbers and the digest of the code
that drew them.
"""
