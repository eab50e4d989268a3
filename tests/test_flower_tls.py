"""The default Flower deployment (issue 18): TLS and SuperNode authentication on 127.0.0.1.

``launch.deploy`` makes throw-away certificates and node keys in its temporary folder, starts the
SuperLink on HTTPS with ``--enable-supernode-auth``, registers each SuperNode's public key with
``flwr supernode register`` and starts the nodes with ``--root-certificates`` and
``--auth-supernode-private-key``. While the run goes, two intruders try to join: a SuperNode with
a key pair the SuperLink never saw, and one with no key at all. Both must be refused and exit,
the SuperLink must list only the registered nodes, plain HTTP and HTTPS against an unknown CA must
fail, and the run must finish with the authorised nodes. The deployment is the one shared with
tests/test_flower_runtime.py (``shared_deployment``, tests/flower_deployment.py: 3 nodes, FDCR, one
node killed in round 3). Bounded in time; every process started carries a unique tag and none may
be left.
"""

from __future__ import annotations

import json
import ssl

import pytest

pytestmark = pytest.mark.flower


def test_tls_and_node_auth_refuse_unregistered_supernodes_and_the_run_completes(shared_deployment):
    d = shared_deployment
    seen, logs, out = d.seen, d.logs, d.out
    s = d.result()
    assert "registered" in seen, seen.get("during-error")

    # TLS: the SuperLink speaks HTTPS only, with a certificate from the deployment's CA
    assert seen["https+ca"] == "HTTP 200"
    assert seen["http"].startswith("failed"), seen["http"]
    assert "CERTIFICATE_VERIFY_FAILED" in seen["https+other-ca"], seen["https+other-ca"]
    link_log = (logs / "superlink.log").read_text(errors="replace")
    assert "Uvicorn running on https://127.0.0.1:" in link_log
    assert "SuperNode authentication is disabled" not in link_log

    # the intruders were refused: each exited non-zero with the SuperLink's reason
    assert seen["rogue-rc"] not in (0, None) and isinstance(seen["rogue-rc"], int), seen["rogue-rc"]
    assert "[code: 2004] Failed to activate SuperNode." in seen["rogue-log"], seen["rogue-log"][-2000:]
    assert "SuperNode ID:" not in seen["rogue-log"]
    assert seen["keyless-rc"] not in (0, None) and isinstance(seen["keyless-rc"], int)
    assert "All SuperNodes must be registered via the CLI" in seen["keyless-log"], \
        seen["keyless-log"][-2000:]
    # ... and the SuperLink knows the registered nodes only, all online
    registered = seen["registered"]
    assert sorted(registered) == ["supernode-0", "supernode-1", "supernode-2"]
    nodes = {int(n["node-id"]): n["status"] for n in seen["nodes"]}
    assert nodes == {i: "online" for i in registered.values()}, seen["nodes"]
    for name, node_id in registered.items():
        assert f"SuperNode ID: {node_id}" in (logs / f"{name}.log").read_text(errors="replace")

    # the run finished with the authorised nodes (all three until one is killed in round 3)
    assert s["complete"] and s["engine"] == "flower-deployment"
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["replies"]["received"] for r in rounds] == [3, 3, 2]

    # the throw-away keys lived in the run's temporary folder, which is gone
    assert not seen["keys"].directory.exists()


def test_flower_keys_writes_what_flwr_loads_and_never_overwrites(tmp_path, capsys):
    """`fisherguard flower-keys`: a CA-signed SuperLink certificate for the given hosts, node keys
    flwr's own loaders accept, private files mode 600, no CA key, and no file overwritten."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from fisherguard.cli import main

    d = tmp_path / "keys"
    assert main(["flower-keys", str(d), "--nodes", "2", "--host", "127.0.0.1",
                 "--host", "link.example"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "node-0", "node-0.pub", "node-1",
                                                   "node-1.pub", "server.key", "server.pem"]
    for name in ("server.key", "node-0", "node-1"):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))  # the CA loads as a trust root
    ctx.load_cert_chain(str(d / "server.pem"), str(d / "server.key"))  # and the pair matches
    for i in (0, 1):
        pub = try_load_public_key(d / f"node-{i}.pub")  # what `flwr supernode register` reads
        key = load_ssh_private_key((d / f"node-{i}").read_bytes(), None)  # what the node reads
        assert public_key_to_bytes(key.public_key()) == pub
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main(["flower-keys", str(d), "--nodes", "1"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
