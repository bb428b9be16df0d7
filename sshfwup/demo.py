"""``python -m sshfwup.demo``: the README's demo (it lives in :mod:`sshfwup.host.demo`)."""

import sys

if __name__ == "__main__":
    from sshfwup.host.demo import main

    sys.exit(main())
