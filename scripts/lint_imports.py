"""Checks the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

navit_clip.data, navit_clip.text and navit_clip.configs live in data/, text/ and configs/
(pyproject.toml's package-dir), but import-linter finds a package's modules by walking its
folder. So this lays the package out as it imports, in a temporary folder of symlinks
(navit_clip/ with its entries, plus data, text and configs), and runs `lint-imports`
there. Exits with lint-imports' status: non-zero when a contract is broken.

  .venv/bin/python scripts/lint_imports.py [lint-imports options, e.g. --verbose]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")


def lay_out(tree: str) -> None:
  """Symlinks each package of pyproject.toml's package-dir to where it imports from."""
  with open(PYPROJECT, "rb") as f:
    package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
  for package, folder in sorted(package_dirs.items()):  # parents before their children
    source = os.path.join(ROOT, folder)
    dest = os.path.join(tree, *package.split("."))
    if os.path.lexists(dest):  # inside a folder linked already (data/sources in data/)
      continue
    if "." in package:
      os.symlink(source, dest)
      continue
    os.makedirs(dest)  # a top-level package: its own entries, and room for the others
    for entry in os.listdir(source):
      if entry != "__pycache__":
        os.symlink(os.path.join(source, entry), os.path.join(dest, entry))


def main(argv: list[str]) -> int:
  lint_imports = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  with tempfile.TemporaryDirectory(prefix="import-graph-") as tree:
    lay_out(tree)
    return subprocess.run([lint_imports, PYPROJECT, "--no-cache", *argv], cwd=tree).returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
