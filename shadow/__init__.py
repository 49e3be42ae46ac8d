"""The shadow: a model that follows a machine read-only and shows where it disagrees with it.

- ``source``: the only code that talks to the followed machine; it monitors and reads, it cannot put.
- ``model``: the design lattice set to the machine's converter values, seen through a calibration.
- ``calibration``: BPM offsets, BPM gains and converter scales, fitted from measurements; a file.
- ``serve``: ``twinioc shadow``, the live shadow's records under its prefix.
- ``replay``: ``twinioc shadow replay``, a journal or an archive export through the model.
"""
