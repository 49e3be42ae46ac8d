"""The measurement layer above the IOC: ophyd-async devices built from a machine's tables, Bluesky
plans and their analyses, a store of runs and results, and the REST service ``twinioc web``.

It meets a machine only through EPICS and ``db/``, so it runs unchanged on a twin or on the machine.
"""
