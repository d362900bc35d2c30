"""The chip on a model: analog layers and everything that acts on them.

* ``layers`` — ``AnalogLinear``, an ``nn.Linear`` whose matmul runs the hardware model;
* ``select`` — which modules are linear maps, output heads, adapters; name patterns;
* ``convert`` — ``convert`` / ``revert``: swap a model's linear layers in place;
* ``calibration`` / ``clipping`` — input-range initialisation and weight clipping;
* ``noise`` — deployment noise (PCM programming, drift, Gaussian), seeded, reversible;
* ``hf`` — the transformers quantization method "afm" (save / load with the chip).

The public names are re-exported by ``afm`` itself.
"""
