"""`python -m server.cli`: how `trainyard up` starts its children (see local_mode)."""

from server.cli import main

if __name__ == "__main__":
    main(prog_name="trainyard")
