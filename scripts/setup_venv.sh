#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs navit-clip (editable) with the extras in
# $EXTRAS (comma-separated, e.g. "test,tf"). Re-running is cheap: it reinstalls only when
# pyproject.toml or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
extras=${EXTRAS:-}
spec="."
[ -n "$extras" ] && spec=".[$extras]"
project=$(cksum < pyproject.toml | cut -d' ' -f1)  # POSIX: Linux and macOS alike
stamp="$venv/.installed-$project-${extras:-base}"
# Installed for this pyproject.toml with these extras (any extras serve the base set)?
if { [ -f "$stamp" ] || { [ -z "$extras" ] && ls "$venv"/.installed-"$project"-* >/dev/null 2>&1; }; } \
    && "$venv/bin/python" -c 'import navit_clip' >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python=$(bash scripts/find_python.sh)
  echo "creating $venv with $python ($("$python" --version))"
  "$python" -m venv "$venv"
fi
echo "installing navit-clip $spec into $venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "$spec"
find "$venv" -maxdepth 1 -name '.installed-*' ! -name ".installed-$project-*" -delete
touch "$stamp"
