"""Where a number came from: package version, git commit of the source, machine and libraries.

Recorded in every run's ``summary.json`` and every benchmark record, so a figure in the docs can
be traced to the code and machine that produced it.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from typing import Optional

import timm
import torch

from .version import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the checkout this package is imported from (``-dirty`` with local changes),
    or None when it is not a git checkout (an installed wheel). Read once per process, when the
    package is imported: the code that runs is the code that was loaded, however the checkout
    changes while a long run goes on."""
    src = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def provenance() -> dict:
    return dict(version=__version__, commit=git_commit(), torch=torch.__version__, timm=timm.__version__,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}",
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M:%S"))


git_commit()  # at import: what this process runs


def save_record(out: str, result: dict, markdown: str, argv: Optional[list] = None) -> None:
    """A benchmark script's record: ``OUT.json`` (``result`` with the command line that made it and
    :func:`provenance`) and ``OUT.md`` (``markdown``, its tables), which is printed too."""
    import json
    import sys
    result = dict(result, command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                  provenance=provenance())
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
