"""Errors a user can act on: each names the file or setting and the problem."""


class CaptioningError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ConfigError(CaptioningError):
    pass


class DownloadError(CaptioningError):
    pass


class UnsafeArchiveError(CaptioningError):
    pass


class DataError(CaptioningError):
    pass


class SubmitError(CaptioningError):
    """A pipeline package or a submission a backend (Kubeflow, Vertex AI) refused."""


class TrainingError(CaptioningError):
    """Training went wrong in a way more epochs cannot fix (a non-finite loss)."""


class DiskFullError(CaptioningError):
    """A volume ran out of space: the message names the file and what is free."""
