"""The configuration reference (docs/configuration.md), generated from the dataclasses into the committed markdown.

Each `<!-- config-table: CLASS [BASE] -->` marker is followed by the table of CLASS's fields (minus BASE's: the
fields mtprl adds to TRL's config), up to `<!-- end config-table -->`. The tables are committed, so the reference
reads on the repository page as well as in the built manual; `make test` fails when they are not current
(tests/test_docs.py), and `python scripts/config_reference.py` rewrites them.

    python scripts/config_reference.py           # regenerate docs/configuration.md in place
    python scripts/config_reference.py --check   # exit 1 (and say which table) when it is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "configuration.md")
END = "<!-- end config-table -->"
# a marker line, then anything (the previous table) up to the end marker, or nothing yet
BLOCK = re.compile(r"(<!-- config-table: (\S+)(?: (\S+))? -->\n)(?:.*?\n" + re.escape(END) + r"\n)?", re.S)


def _load(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`"


def config_table(cls_path: str, base_path: str | None = None) -> str:
    """A markdown table of CLASS's fields (name, default, help), leaving out those BASE already has."""
    inherited = {f.name for f in dataclasses.fields(_load(base_path))} if base_path else set()
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(_load(cls_path)):
        if f.name in inherited:
            continue
        text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        default = _default(f).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {default} | {html.escape(text, quote=False)} |")
    return "\n".join(rows)


def render(markdown: str) -> str:
    """The markdown with every config table regenerated after its marker."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{config_table(m.group(2), m.group(3))}\n{END}\n", markdown)


def stale_tables(markdown: str) -> list[str]:
    """The classes whose committed table differs from the generated one."""
    fresh = {m.group(2): m.group(0) for m in BLOCK.finditer(render(markdown))}
    return [m.group(2) for m in BLOCK.finditer(markdown) if fresh.get(m.group(2)) != m.group(0)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    with open(REFERENCE) as f:
        current = f.read()
    if args.check:
        stale = stale_tables(current)
        if stale:
            print(f"{REFERENCE}: out of date for {', '.join(stale)}; run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    with open(REFERENCE, "w") as f:
        f.write(render(current))
    return 0


if __name__ == "__main__":
    sys.exit(main())
