"""Local mode, `trainyard up`: everything on one machine, kept running, no setup.

Only the CLI uses this package; the server, the worker and shared/ never import it.

- up_command: the `up` command: checks, then start-up in order, then shutdown in order;
- preflight: what `up` checks before it starts anything (the port, Redis);
- run_dir: TRAINYARD_HOME/run: one `up` per home (a lock), the state file, and
  stopping what a killed `up` left running;
- admin_bootstrap: the first admin account and the CLI's token file;
- children: the processes `up` runs (web, worker, reconciler);
- supervisor: starting, restarting (with backoff) and stopping child processes;
- supervision_loop: the loop `up` runs until Ctrl-C;
- embedded_redis: a private redis-server keeping its data in TRAINYARD_HOME/redis
  (also the test suite's Redis);
- processes: telling a live process of ours from a pid since reused.

The check for the worker extra is in server/cli/install_checks.py: `trainyard worker`
makes it too.
"""
