"""Code that both the web server and the workers use: settings, database, models,
the JobSpec schema, the job state machine and the Celery app factory.

Nothing in this package imports Flask or torch.
"""

__version__ = "0.1.0"
