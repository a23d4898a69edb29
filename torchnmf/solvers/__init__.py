"""Solvers and the one fitting loop: how iterations update the factors.

A solver is a class built from a :class:`~.problem.FitProblem` (the target's
statistics object, the factors, beta, penalties and fixed components) whose
``step()`` runs one iteration in place and returns the objective before it.
It talks to the target only through the statistics interface of
:mod:`torchnmf.targets`, so every target kind works with every solver.
:func:`~.loop.run_fit` owns stopping, history, progress bar and callbacks for
all of them.

Members: :mod:`.registry` (solvers by name, and their declared features),
:mod:`.problem`, :mod:`.loop`, :mod:`.penalty`, :mod:`.scaling` (the
normalised problem a fit solves, and back), and one module per method,
holding its mathematics as functions and its solver class: :mod:`.mu`
(multiplicative updates), :mod:`.hals`, :mod:`.extrapolation` (with the
template :mod:`.alternating`), :mod:`.sparseness` (Hoyer's projected
gradient for ``sparse_fit``), :mod:`.em` (PLCA's EM step) and :mod:`.online`
(minibatch NMF: a ``W`` step per batch of rows, outside the loop).  A new solver
provides ``step()`` and joins :data:`~.registry.SOLVERS`.
"""
