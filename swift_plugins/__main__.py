"""python -m swift_plugins --list: the plugin files for `swift ... --external_plugins`, one absolute path a line."""
from __future__ import annotations

import argparse
import sys

from swift_plugins import PLUGIN_DIR, plugin_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swift_plugins", description=__doc__)
    ap.add_argument("--list", action="store_true", help="print the plugin files, one absolute path a line")
    ap.add_argument("--dir", default=str(PLUGIN_DIR), help="plugin folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.list:
        ap.print_help()
        return 2
    for path in plugin_files(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
