"""Exceptions the training code raises for the runner to map to a job outcome."""


class JobCancelled(Exception):
    """The job was asked to stop (should_stop() returned True); record it as cancelled."""


class UserError(Exception):
    """The job itself cannot succeed (diverged loss, incompatible checkpoint, ...).

    The runner records the job as failed with this message and does not retry it:
    another attempt would fail the same way.
    """
