r"""Which tensors are a matrix model's own reconstruction :math:`H W^\top`.

:class:`~torchnmf.nmf.NMF` records each output it computes from its own
parameters with gradients enabled.  A trainer that receives such a tensor as
its prediction knows the prediction's exact structure, so it can use the
closed-form statistics of :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`
(Gram products at beta=2) instead of generic vector-Jacobian products.

A record holds no strong reference to the output (it is dropped when the
output is freed), and it stops counting as soon as the output or either factor
is modified in place (tensor version counters), so a stale record can never
describe a tensor that no longer equals :math:`H W^\top`.  Nothing is attached
to the tensor itself, so pickling or saving it is unaffected.
"""
import weakref

__all__ = ["record_matrix_reconstruction", "matrix_factors_of"]

_RECORDS = {}


def record_matrix_reconstruction(output, H, W):
    """Note that ``output`` equals ``H @ W.T`` for the current values of ``H`` and ``W``."""
    key = id(output)

    def forget(ref, key=key):
        entry = _RECORDS.get(key)
        if entry is not None and entry[0] is ref:
            del _RECORDS[key]

    _RECORDS[key] = (weakref.ref(output, forget), H, W, output._version, H._version, W._version)


def matrix_factors_of(prediction):
    """``(H, W)`` when ``prediction`` is still exactly ``H @ W.T`` as recorded, else ``None``."""
    entry = _RECORDS.get(id(prediction))
    if entry is None or entry[0]() is not prediction:
        return None
    _, H, W, version, version_H, version_W = entry
    if (prediction._version, H._version, W._version) != (version, version_H, version_W):
        return None
    return H, W
