"""One module per stage: transfer, prune, export, quantize, validate, bundle.

Each stage has a ``NAME``, a ``VERSION`` (bump it when its output for the same inputs
changes) and a ``run`` function that writes its outputs into a fresh folder given by the
pipeline and returns a JSON-able dict of metrics.
"""
