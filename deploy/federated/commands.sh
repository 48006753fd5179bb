# Federated deployment: a Flower SuperLink (coordinator) and one SuperNode per silo, TLS and
# SuperNode authentication. Not a script to run in one go: each step says on which machine it runs.
# Run every step from a copy of this folder (deploy/federated) with silotune's .venv active
# (`source .venv/bin/activate`). tests/deploy/test_federated_deploy.py runs these steps verbatim
# on loopback (it sets the variables below to a free port and a temporary folder).

# step: settings (every machine)
export SUPERLINK_HOST=127.0.0.1 SUPERLINK_PORT=8000   # where the silos reach the coordinator
export FLWR_HOME="$PWD/flwr-home"   # flwr's config and state for this deployment; ~/.flwr stays untouched

# step: keygen (a trusted machine, once; then give each party only its folder under keys/)
silotune keygen --out keys --silos 2 --host "$SUPERLINK_HOST"

# step: superlink (coordinator; runs until stopped)
flower-superlink --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" --ssl-ca-certfile keys/coordinator/ca.pem --ssl-certfile keys/coordinator/server.pem --ssl-keyfile keys/coordinator/server.key --enable-supernode-auth --disable-runtime-dependency-installation --database "$FLWR_HOME/superlink.db"

# step: connection (coordinator; adds a SuperLink connection named silotune to $FLWR_HOME/config.toml, appending, never overwriting)
mkdir -p "$FLWR_HOME" && printf '[superlink.silotune]\naddress = "%s:%s"\nroot-certificates = "%s"\n' "$SUPERLINK_HOST" "$SUPERLINK_PORT" "$PWD/keys/coordinator/ca.pem" >> "$FLWR_HOME/config.toml"

# step: register (coordinator; only registered SuperNode keys may connect)
flwr supernode register keys/silo-0/supernode.pub silotune && flwr supernode register keys/silo-1/supernode.pub silotune

# step: check-0 (silo-0, before it connects: certificates, keys, enrollment, registration)
silotune federate check silo-0.yaml --root-certificates keys/silo-0/ca.pem --auth-supernode-private-key keys/silo-0/supernode.key --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT"

# step: supernode-0 (silo-0; runs until stopped)
flower-supernode --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" --root-certificates keys/silo-0/ca.pem --auth-supernode-private-key keys/silo-0/supernode.key --port 9094 --node-config "partition-id=0 config='$PWD/silo-0.yaml'"

# step: supernode-1 (silo-1; on its own machine the default --port 9094 would do, two SuperNodes on one host need two ports)
flower-supernode --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" --root-certificates keys/silo-1/ca.pem --auth-supernode-private-key keys/silo-1/supernode.key --port 9095 --node-config "partition-id=1 config='$PWD/silo-1.yaml'"

# step: run (coordinator; the app ships inside the installed silotune package; waits for the run to end)
flwr run "$(silotune federate app)" silotune --run-config "config='$PWD/coordinator.yaml'" --stream
