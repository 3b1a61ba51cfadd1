#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs navit-clip (editable) with its test extra.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ] && "$venv/bin/python" -c 'import navit_clip' >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python=$(bash scripts/find_python.sh)
  echo "creating $venv with $python ($("$python" --version))"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[test]"
rm -f "$venv"/.installed-*
touch "$stamp"
