#!/usr/bin/env bash
# Prints the path of a working Python >= 3.12 interpreter, or fails with a message.
#
# Tries, in order: $PYTHON, python3.13/3.12 on PATH, python3, every pyenv and asdf
# install, uv-managed Pythons, and the usual system locations. Each candidate is *run*
# (a pyenv shim on PATH may exist yet fail), and must report a version >= 3.12 and have venv;
# 3.12 and 3.13 are preferred over newer ones.
set -u
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.14 python3.13 python3.12 python3 python; do
  p=$(command -v "$name" 2>/dev/null) && candidates+=("$p")
done
roots=()
command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root 2>/dev/null)/versions")
roots+=("${PYENV_ROOT:-$HOME/.pyenv}/versions" "$HOME/.asdf/installs/python" \
        "$HOME/.local/share/uv/python")
for root in "${roots[@]}"; do
  for p in $(ls -d "$root"/*/bin/python3 2>/dev/null | sort -V); do candidates+=("$p"); done
done
for p in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/homebrew/bin/python3.1[2-9]; do
  [ -x "$p" ] && candidates+=("$p")
done
# First pass: the versions every dependency ships wheels for; second pass: any >= 3.12.
for check in '(3, 12) <= sys.version_info < (3, 14)' 'sys.version_info >= (3, 12)'; do
  for p in "${candidates[@]}"; do
    if "$p" -c "import sys, venv; sys.exit(0 if $check else 1)" >/dev/null 2>&1; then
      "$p" -c 'import sys; print(sys.executable)'
      exit 0
    fi
  done
done
echo "navit-clip needs Python >= 3.12 (current JAX requires it); none found among:" >&2
printf '  %s\n' "${candidates[@]}" >&2
echo "Install one (e.g. 'pyenv install 3.12' or 'uv python install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
