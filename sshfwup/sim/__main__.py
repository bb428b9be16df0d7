"""``python -m sshfwup.sim ...``: the simulator's command line (see ``sshfwup.sim.cli``)."""

import sys

from sshfwup.sim.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sshfwup.sim"))
