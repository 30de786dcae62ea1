"""The experiment runner: the paper's experiments end to end, built on ``engine`` and ``seg``.

``engine`` (the generation library) and ``seg`` (the segmentation library) never import
this package; it composes them: ``sweep`` runs ingest -> ControlNet -> Ray generation ->
FID / judge -> segmentation schemes as resumable stages, ``identity`` decides whether a
stage's output can be reused, ``report`` turns a run folder into tables, plots and sample
grids. The CLIs are ``python -m jobs.demo`` and ``python -m jobs.sweep``.
"""
