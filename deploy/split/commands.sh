# Split deployment: `silotune serve` on the coordinator and `silotune join` on each silo, every
# frame over gRPC + TLS and AEAD-encrypted. Not a script to run in one go: each step says on which
# machine it runs. Run every step from a copy of this folder (deploy/split) with silotune's .venv
# active (`source .venv/bin/activate`). tests/deploy/test_split_deploy.py runs these steps
# verbatim on loopback (it sets the variables below to a free port).

# step: settings (every machine)
export COORDINATOR_HOST=127.0.0.1 COORDINATOR_PORT=50051   # where the silos reach the coordinator

# step: keygen (a trusted machine, once; then give each party only its folder under keys/)
silotune keygen --out keys --silos 2 --host "$COORDINATOR_HOST"

# step: serve (coordinator; waits for both silos, trains, then exits)
silotune serve coordinator.yaml --set split.address="$COORDINATOR_HOST:$COORDINATOR_PORT"

# step: join-0 (silo-0)
silotune join silo-0.yaml --set split.address="$COORDINATOR_HOST:$COORDINATOR_PORT"

# step: join-1 (silo-1)
silotune join silo-1.yaml --set split.address="$COORDINATOR_HOST:$COORDINATOR_PORT"
