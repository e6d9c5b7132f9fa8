#!/usr/bin/env bash
# README's route into a user's own environment, run as written (issue 24): a fresh virtual
# environment holding only torch, numpy and mup from the registry (plus scikit-learn, whose
# bundled digits the example trains on); then the commands of README's block that follows
# "Into your own virtual environment", read from README.md itself and run from the
# repository root as a user would (maturin's own target directory: nothing set to help it);
# then the digits example from outside the source tree, so that the installed wheel is what
# is imported. pip's cache (filled by scripts/setup) spares the downloads; the environment is
# removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
commands="$(awk '/^Into your own virtual environment/ {found = 1}
    found && /^```sh$/ {inside = 1; next}
    inside && /^```$/ {exit}
    inside {print}' README.md)"
if [ -z "$commands" ]; then
    echo "README.md: no \`\`\`sh block after 'Into your own virtual environment'" >&2
    exit 1
fi
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
source "$tmp/venv/bin/activate"
pip install --quiet --disable-pip-version-check torch numpy mup scikit-learn
# The wheel must come from these commands, not from an earlier build.
rm -f target/wheels/mulo-*.whl
unset CARGO_TARGET_DIR
echo "README's commands:"
echo "$commands"
bash -euo pipefail -c "$commands"
cd "$tmp"
python -c "import mulo.torch; print('mulo', mulo.__version__, 'from', mulo.__file__)"
python "$root/examples/torch_digits.py" --require 0.9
echo "wheel in a fresh environment: README's route works as written"
