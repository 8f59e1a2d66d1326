"""The ``breakscene`` command line: one parser for the library's, the pipeline's and the study's commands."""
