"""MkDocs hooks: the report files (figures, report.md, JSON) under reports/ published beside the pages that link to
them. (The configuration reference is generated into docs/configuration.md itself: scripts/config_reference.py.)"""

from __future__ import annotations

import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
