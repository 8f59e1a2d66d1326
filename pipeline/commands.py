"""Pipeline commands (run, submit, report) registered on the ``breakscene`` parser."""


def add_parsers(sub) -> None:
    pass
