# Sourced by scripts/up and scripts/test: creates .venv and installs the project into it,
# again only when what the install builds from changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.zeitwork-installed
# The install compiles the proxy's hot path (setup.py): it is done again when the packaging
# or one of the compiled modules changed.
compiled=$(sed -n 's/^    "\(edge\/.*\.py\)",$/\1/p' setup.py)
want=$(cat pyproject.toml setup.py mypyc.ini $compiled | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
