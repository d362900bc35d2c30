"""The analog layer as one op with several backends.

* ``dispatch`` — picks the backend once per layer and device and calls it;
* ``torch_chains`` — the elementwise chains in torch (backend ``torch``, the oracle);
* ``numba_chains`` — the same chains as fused numba kernels (backend ``numba``, CPU).

The fused Triton kernels live in the top-level ``triton_kernels`` folder (installed as
``afm.triton_kernels``).  Nothing here is imported by ``import afm`` until a layer runs.
"""
