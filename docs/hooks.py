"""MkDocs hooks: the configuration reference generated from the dataclasses, and the report files (figures,
report.md, JSON) under reports/ published beside the pages that link to them."""

from __future__ import annotations

import dataclasses
import html
import importlib
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- config-table: (\S+)(?: (\S+))? -->")


def _load(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(f):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`"


def config_table(cls_path: str, base_path: str | None = None) -> str:
    cls = _load(cls_path)
    inherited = {f.name for f in dataclasses.fields(_load(base_path))} if base_path else set()
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        default = _default(f).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {default} | {html.escape(text, quote=False)} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: config_table(m.group(1), m.group(2)), markdown)


def on_files(files, config):
    """Publish reports/**/{png,md,json} at reports/... so that pages can link to the figures and reports."""
    for folder, _, names in os.walk(os.path.join(ROOT, "reports")):
        if os.sep + "runs" in folder[len(ROOT):]:
            continue  # run directories: checkpoints and logs, not documentation
        for name in names:
            if name.endswith((".png", ".md", ".json")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                files.append(File(rel, src_dir=ROOT, dest_dir=config["site_dir"],
                                  use_directory_urls=config["use_directory_urls"]))
    return files
