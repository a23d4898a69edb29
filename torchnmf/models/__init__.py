"""Construction of models: factors, forward maps, and fit requests.

The public model classes live in :mod:`torchnmf.nmf` and :mod:`torchnmf.plca`;
what they share lives here.  :mod:`.factors` builds and checks the factor
parameters and infers shapes and ranks (``FactorModule``); :mod:`.forward`
holds the forward maps (a matrix product, transposed convolutions);
:mod:`.provenance` lets the trainers recognise an ``NMF``'s own output;
:mod:`.fitting` turns a fit request (``fit``, ``transform``, ``sparse_fit``)
into a checked :class:`~torchnmf.solvers.problem.FitProblem` and runs it.
A new model family reuses these rather than re-deriving shapes or checks.
"""
