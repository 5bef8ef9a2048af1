"""`extproc serve --workers N` under a read-only root filesystem (the Deployment's
readOnlyRootFilesystem), run as Linux would run it: a private mount namespace where /tmp and
/var/tmp are read-only bind mounts and only the configured state directory is writable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.stack import free_port, stop_process

from .conftest import ROOT, docs

EXTPROC = str(Path(sys.executable).parent / "extproc")
# Read-only binds over every directory tempfile.gettempdir() would try, then the
# writable volumes ($RW: the state dir, the store's dir) bound on themselves and remounted
# read-write, then the command in a read-only working directory (the image's WORKDIR).
SANDBOX = (
    'set -e; for d in /tmp /var/tmp; do mount --bind "$d" "$d"; mount -o remount,ro,bind "$d"; done; '
    'for d in $RW; do mount --bind "$d" "$d"; mount -o remount,rw,bind "$d"; done; cd "$RO"; exec "$@"'
)


def sandboxed() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount --bind /tmp /tmp"], capture_output=True)
    return r.returncode == 0


needs_namespaces = pytest.mark.skipif(not sandboxed(), reason="no unprivileged mount namespaces (unshare -rm)")


def serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.integration
@needs_namespaces
@pytest.mark.parametrize("how", ["flag", "env"])
def test_workers_start_with_a_read_only_tmp_and_a_writable_state_dir(tmp_path, how):
    policy = yaml.safe_load((ROOT / "policies" / "demo.yaml").read_text())
    policy.pop("self_hosted", None)  # its metrics_url names a compose host
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    state = tmp_path / "state"
    state.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    ro = tmp_path / "cwd"  # the image's WORKDIR is read-only too
    ro.mkdir()
    addr = f"127.0.0.1:{free_port()}"
    cmd = [EXTPROC, "serve", "--policy", str(tmp_path / "policy.yaml"), "--store", f"sqlite://{store}/b.db",
           "--grpc", addr, "--workers", "2", "--allow-unauthenticated-callers"]
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "EXTPROC_STATE_DIR")}
    # the store's directory is a volume too (Redis in the manifests)
    env.update(RW=f"{state} {store}", RO=str(ro), TMPDIR="/tmp")
    if how == "flag":
        cmd += ["--state-dir", str(state)]
    else:
        env["EXTPROC_STATE_DIR"] = str(state)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", SANDBOX, "sh", *cmd], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            text = (tmp_path / "serve.log").read_text()
            if text.count("extproc listening") == 2 and serving(addr):
                break
            time.sleep(0.2)
        text = (tmp_path / "serve.log").read_text()
        assert proc.poll() is None, text[-3000:]
        assert text.count(f"extproc listening {addr}") == 2, text[-3000:]  # both workers bound the port
        assert all(serving(addr) for _ in range(10))
        (metrics,) = state.iterdir()  # the workers' shared metrics files live in the state dir
        assert metrics.name.startswith("extproc-metrics-")
    finally:
        stop_process(proc)
        log.close()
    assert not any(state.iterdir())  # removed on a clean stop


def test_the_image_and_the_deployment_give_the_workers_a_writable_state_dir():
    """The image sets EXTPROC_STATE_DIR; the Deployment (read-only root) mounts an emptyDir there."""
    text = (ROOT / "compose" / "Dockerfile").read_text()
    (state_dir,) = [l.split("EXTPROC_STATE_DIR=", 1)[1].split()[0] for l in text.splitlines() if "EXTPROC_STATE_DIR=" in l]
    (deploy,) = [d for d in docs(ROOT / "deploy" / "istio" / "extproc.yaml") if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "extproc"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == state_dir]
    assert not mount.get("readOnly")
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in vol
