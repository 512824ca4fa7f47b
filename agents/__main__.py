import sys

from agents.cli import main

# Guarded: worker processes that multiprocessing spawns (agents/delta.py) import the main
# module again, and must not start another agent.
if __name__ == "__main__":
    sys.exit(main())
