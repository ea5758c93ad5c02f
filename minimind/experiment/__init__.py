"""Experiments as cached step graphs: one file from corpus to chat model; re-runs redo only what changed.

``spec.py`` reads and checks the file, ``graph.py`` hashes each step and finds what is done, ``runner.py``
runs the rest on Ray (``steps.py``: what each kind does), ``record.py`` writes the provenance record, and
``launch.py`` is the command line (``ray_jobs/experiment.py``).
"""
