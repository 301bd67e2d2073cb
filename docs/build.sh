#!/usr/bin/env bash
# Build the documentation site with warnings as errors. Installs nothing: run it in an
# environment with the docs extra (`pip install -e './core[docs]'`).
# Usage: bash docs/build.sh [SITE_DIR]   (default: site/ at the repository root, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
site_dir="${1:-site}"
python -m mkdocs build --strict --clean --config-file mkdocs.yml --site-dir "$site_dir"
