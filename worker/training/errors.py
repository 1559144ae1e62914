"""Exceptions the training code raises for the runner to map to a job outcome."""


class JobCancelled(Exception):
    """The job was asked to stop (should_stop() returned True); record it as cancelled."""


class UserError(Exception):
    """The job itself cannot succeed (diverged loss, incompatible checkpoint, ...).

    The runner records the job as failed with this message and does not retry it:
    another attempt would fail the same way.
    """


class DatasetError(UserError):
    """A dataset file is missing, corrupt, or larger than its header or the configured
    maximum allows. The job's own problem (the data it names), so it is not retried;
    recorded with error_type "DatasetError"."""


class NotEnoughDevices(UserError):
    """The job asks for more GPUs than the worker slot it landed on has. Refused rather
    than trained on fewer: a job never silently gets less than it asked for. Not
    retried by the runner (routing a job to a slot large enough is the scheduler's)."""


class RankFailed(Exception):
    """A data-parallel job's other rank process died or failed; the message says which
    and how, with the last line it wrote."""
