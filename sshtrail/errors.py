"""The one base class of errors that carry a message for the operator: the CLI prints them and
exits non-zero; anything else is a bug and keeps its traceback."""


class SshtrailError(Exception):
    pass
