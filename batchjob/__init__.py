"""What every batch job kind shares (the extraction pipeline and the robustness study): job files,
shared settings, cluster start-up, the output lease, preflight, manifests, segmenters, artifacts, submission.
Above the library, below ``pipeline`` and ``robustness``, which never import each other."""
