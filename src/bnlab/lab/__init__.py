"""bnlab's lab: the experiments of the seeds, runnable from the `bnlab` command line.

The lab imports the library (bnlab); the library never imports the lab.
"""
