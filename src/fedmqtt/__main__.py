"""``python -m fedmqtt``: the ``fedmqtt`` command, for when the script is not on PATH."""

import sys

from fedmqtt.cli import main

if __name__ == "__main__":
    sys.exit(main())
