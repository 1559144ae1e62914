"""`python -m server.cli`: how `trainyard up` starts its children (server/cli/local/children.py)."""

from server.cli import main

if __name__ == "__main__":
    main(prog_name="trainyard")
