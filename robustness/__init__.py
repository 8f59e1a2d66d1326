"""The noisy-mask robustness study, a second product beside the extraction pipeline:
how Break-A-Scene's concepts degrade as the masks it is given get worse.

- ``grid``: the study's job file (``StudyConfig``) and its cells
- ``groundtruth``: scenes with clean masks (manifest, COCO, generated)
- ``workers``: ``StudyWorker`` actors: perturb, extract, measure one cell
- ``driver``: the Ray job (``breakscene run`` on a ``kind: study`` file), GPU-hour estimate,
  measurements table
- ``report``: ``breakscene report`` (figures, tables, HTML from ``templates/``)

Shares with ``pipeline/`` only its public helpers: cluster start-up and GPU sharing
(``batchjob.cluster``), done-markers and Parquet files (``batchjob.artifacts``), and the
job file's building blocks (``pipeline.config``). The mask maths (``breakscene.scenes.noise``,
``breakscene.scenes.masks``) stays in the library.
"""
