#!/usr/bin/env bash
# Build the cluster node image from the repository root, recording the commit it is built from
# (hardmix.train.git_commit's rule: the HEAD commit, "+modified" when `git status` lists changes).
#   docker/build.sh IMAGE:TAG [docker build options...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: docker/build.sh IMAGE:TAG [docker build options...]" >&2
  exit 2
fi
tag="$1"
shift
commit="$(git rev-parse HEAD)"
if [ -n "$(git status --porcelain)" ]; then
  commit="$commit+modified"
fi
exec docker build -f docker/Dockerfile --build-arg "HARDMIX_COMMIT=$commit" -t "$tag" "$@" .
