"""Regenerate the option lists in docs/stages.md from the CLI's own `--help` text.

Each `<!-- options: STAGE -->` marker in the page is followed by a fenced block holding the options part of
`patchsae STAGE --help`; this script replaces those blocks, so the page never drifts from the parser.

    PYTHONPATH=src python scripts/docs_options.py [--check]
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "stages.md"
MARKER = re.compile(r"(<!-- options: (?P<stage>[\w-]+) -->\n)```text\n.*?```\n", re.S)


def options_text(stage: str) -> str:
    """The `options:` section of `patchsae STAGE --help` (usage and description are written in the page)."""
    help_text = subprocess.run([sys.executable, "-m", "patchsae", stage, "--help"], check=True,
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"}).stdout
    start = help_text.find("options:")
    return help_text[max(start, 0):].rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date, write nothing")
    args = parser.parse_args()
    page = PAGE.read_text()
    fresh = MARKER.sub(lambda m: m.group(1) + "```text\n" + options_text(m.group("stage")) + "```\n", page)
    if args.check:
        return int(fresh != page)
    PAGE.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
