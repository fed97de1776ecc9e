"""The ``weft`` command's entry point: ``weft run`` is the agent (``weft.runcmd``); every other command talks to a
running agent (``weft.commands``, on click).

The two are told apart here, before either is imported: the agent runs for months, and what it imports stays
resident all that time. click, which the other commands are built on, is about 1.3 MiB of an agent's memory for
reading its command line once; ``weft run`` reads its flags with the standard library's argparse instead.
"""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        from weft.runcmd import run

        run(args[1:])
    else:
        from weft.commands import main as commands

        commands()


if __name__ == "__main__":
    main()
