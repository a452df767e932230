#!/usr/bin/env bash
# `make run`: a coordinator and three agents labelled eu, us and ap on this machine,
# with deploy/examples/checks.yaml. Ctrl-C stops them all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vantage=${VANTAGE:-"$here/../../.venv/bin/vantage"}

pids=()
stop() { trap - EXIT INT TERM; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

"$vantage" coordinator --config "$here/coordinator.yaml" --log-format console &
pids+=($!)
for _ in $(seq 50); do
  "$vantage" status --timeout 1 >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "the coordinator did not start (see above)" >&2; exit 1; }
  sleep 0.2
done
for region in eu us ap; do
  "$vantage" agent --coordinator 127.0.0.1:7400 --name "$region-1" --region "$region" \
    --token-file "$here/tokens/$region-1.token" --log-format console --log-level warning &
  pids+=($!)
done

cat <<INFO

  Vantage is running: a coordinator and agents eu-1, us-1, ap-1.
    metrics   http://127.0.0.1:9470/metrics
    health    http://127.0.0.1:9470/healthz
    JSON API  http://127.0.0.1:9470/api/v1/verdicts (OpenAPI: /api/v1/openapi.yaml)
    gRPC API  127.0.0.1:7400 (query service, health, reflection)
  From another shell:
    .venv/bin/vantage status        verdicts (first ones within ~15 s)
    .venv/bin/vantage agents        the fleet
    .venv/bin/vantage check URL     down for everyone, or just me? (private and
                                    loopback targets are refused: on_demand.allow)
  Ctrl-C stops everything.

INFO
wait -n "${pids[@]}"
