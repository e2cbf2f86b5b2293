"""The default corpus: Python standard-library source files, which every machine with Python already has.

Real text with real structure (a model's loss falls well below the unigram entropy), no download, no
licence question.  The module list is fixed; each entry is a single pure-Python file in CPython 3.10, 3.11,
3.12 and 3.13 (modules that were removed, or that became packages, in any of those versions are left out).
The *content* of these files still differs between Python versions, so two machines with different Pythons
train on slightly different corpora: that is why the corpus hash is recorded with every run.
"""

from __future__ import annotations

import os
import sysconfig

STDLIB_MODULES: tuple[str, ...] = (
    "_collections_abc",
    "_pydecimal",
    "_pyio",
    "argparse",
    "ast",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "codecs",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "doctest",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "heapq",
    "imaplib",
    "inspect",
    "ipaddress",
    "locale",
    "mailbox",
    "mimetypes",
    "ntpath",
    "optparse",
    "os",
    "pdb",
    "pickle",
    "pickletools",
    "platform",
    "plistlib",
    "pprint",
    "pstats",
    "pydoc",
    "random",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "uuid",
    "weakref",
)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(modules: tuple[str, ...] = STDLIB_MODULES) -> list[tuple[str, str]]:
    """``(module, path)`` sorted by name; a missing file is an error naming it (no silent shrinkage)."""
    root = stdlib_dir()
    out = []
    for mod in sorted(modules):
        path = os.path.join(root, mod + ".py")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"stdlib corpus: {path} not found (module {mod!r}); this Python install lacks part of its "
                "standard library sources. Use data.name=memmap or data.name=synthetic instead."
            )
        out.append((mod, path))
    return out
