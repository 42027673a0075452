"""The deployment artifacts under deploy/, each exercised as far as this
machine allows (no container registry, no Kubernetes, no systemd as PID 1):

- container image (deploy/Dockerfile): built with podman around a static
  binary and run in front of the real Dovecot (tests/e2e/container-test.sh);
- Kubernetes (deploy/kubernetes/): the Deployment and ConfigMap run as a pod
  with `podman kube play` (tests/e2e/kube-play-test.sh), schema-validated
  offline, linted, checked for consistency, and the proxy configuration run
  in front of the real Dovecot and Postfix with a certificate directory laid
  out and rotated the way kubelet updates a Secret volume;
- Compose (deploy/compose.yaml): compose-spec schema, every configuration it
  mounts checked by its own tool (proxy, Dovecot, Postfix, Prometheus),
  Dockerfiles linted;
- systemd (deploy/systemd/): systemd-analyze verify and security, and its
  ExecStart/ExecReload/KillSignal run as the unit would (unprivileged uid,
  only CAP_NET_BIND_SERVICE, a port below 1024);
- alerts (deploy/prometheus/): promtool check rules and promtool unit tests;
- dashboard (deploy/grafana/): well-formed, valid PromQL, and every metric it
  or the alerts use is one a running proxy exports (scraped).

Tools come from tests/e2e/install-deps.sh. Under CI=true a missing tool is a
failure; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig
from proxy_process import REPO_ROOT, RUNNING_IN_CI, need, proxy_binary_path, run, unavailable
from servers import pick_free_loopback_ports, tail_of_file

yaml = pytest.importorskip("yaml")  # PyYAML comes with yamllint

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
E2E = Path(__file__).resolve().parent
STATIC_DIR = REPO_ROOT / "target" / "static"
CRD_VALIDATE_CACHE = REPO_ROOT / "target" / "crd-validate"


def debug_binary() -> Path:
    binary = proxy_binary_path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        unavailable(f"proxy binary {binary} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")
    return binary


def new_certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A fresh self-signed pair (fullchain.pem, privkey.pem) in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "30", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(chain)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return chain, key


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# -- what the artifacts say ----------------------------------------------------------


def k8s_objects() -> list[tuple[Path, dict]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        objects += [(path, document) for document in yaml.safe_load_all(path.read_text()) if document]
    return objects


def k8s_object(kind: str) -> dict:
    matches = [obj for _, obj in k8s_objects() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def sidecar_config() -> tuple[str, dict]:
    """The proxy's config.toml from the ConfigMap, as text and parsed."""
    text = k8s_object("ConfigMap")["data"]["config.toml"]
    return text, tomllib.loads(text)


def proxy_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "mail-tls-proxy")


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "mail-tls-proxy.json").read_text())


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names_in(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\bmail_tls_proxy_[a-z0-9_]+\b", expr)}


def scraped_metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


# -- YAML, everywhere ------------------------------------------------------------------

YAMLLINT_CONFIG = ("{extends: default, rules: {document-start: disable, line-length: {max: 120,"
                   " allow-non-breakable-inline-mappings: true}}}")


def test_every_deploy_yaml_file_passes_yamllint():
    need("yamllint")
    files = sorted(str(p) for p in DEPLOY.rglob("*.y*ml"))
    assert len(files) >= 9, files
    result = run(["yamllint", "--strict", "-d", YAMLLINT_CONFIG, *files])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes ------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas():
    need("kubernetes-validate")
    core = [str(path) for path, obj in k8s_objects() if "." not in obj["apiVersion"].split("/")[0]
            or obj["apiVersion"].startswith("apps/")]
    assert {Path(p).name for p in core} == {"configmap.yaml", "deployment.yaml", "service.yaml"}, core
    result = run(["kubernetes-validate", "--strict", *core])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == 3, result.stdout
    # The validator does reject what it should (a misspelt probe field).
    broken = (K8S / "deployment.yaml").read_text().replace("periodSeconds: 10", "periodSecond: 10", 1)
    scratch = REPO_ROOT / "target" / "k8s-broken.yaml"
    scratch.parent.mkdir(exist_ok=True)
    scratch.write_text(broken)
    result = run(["kubernetes-validate", "--strict", str(scratch)])
    assert result.returncode != 0 and "periodSecond" in result.stdout + result.stderr


def test_cert_manager_and_prometheus_operator_objects_validate_against_their_crd_schemas(tmp_path):
    node, npm = need("node"), need("npm")
    CRD_VALIDATE_CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "validate.mjs"):
        source = E2E / "crd-validate" / name
        target = CRD_VALIDATE_CACHE / name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copy(source, target)
            shutil.rmtree(CRD_VALIDATE_CACHE / "node_modules", ignore_errors=True)
    if not (CRD_VALIDATE_CACHE / "node_modules").is_dir():
        result = run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CRD_VALIDATE_CACHE)
        if result.returncode != 0:
            unavailable(f"npm ci of the CRD schemas failed: {result.stderr[-2000:]}")
    custom = [obj for _, obj in k8s_objects() if obj["apiVersion"].split("/")[0] in
              ("cert-manager.io", "monitoring.coreos.com")]
    assert sorted(obj["kind"] for obj in custom) == ["Certificate", "PodMonitor"]
    # The alerts as a PrometheusRule, as the PodMonitor's comment suggests.
    custom.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                   "metadata": {"name": "mail-tls-proxy"},
                   "spec": yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())})
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(custom))
    result = run([node, str(CRD_VALIDATE_CACHE / "validate.mjs"), str(objects)], cwd=CRD_VALIDATE_CACHE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("OK ") == 3, result.stdout
    # A wrong enum value is caught.
    broken = json.loads(json.dumps(custom[:1]))
    broken[0]["spec"]["privateKey"]["algorithm"] = "DSA"
    objects.write_text(json.dumps(broken))
    result = run([node, str(CRD_VALIDATE_CACHE / "validate.mjs"), str(objects)], cwd=CRD_VALIDATE_CACHE)
    assert result.returncode == 1 and "algorithm" in result.stdout, result.stdout


def test_kubernetes_sidecar_pieces_fit_together():
    text, config = sidecar_config()
    deployment = k8s_object("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    proxy = proxy_container(deployment)
    service = k8s_object("Service")
    certificate = k8s_object("Certificate")
    pod_monitor = k8s_object("PodMonitor")

    # Listeners: the seven mail ports, published by the container and the Service.
    listen_ports = {int(listener["listen"].rsplit(":", 1)[1]) for listener in config["listener"]}
    assert listen_ports == {25, 465, 587, 993, 995, 143, 110}
    container_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    assert container_ports.pop("metrics") == metrics_port
    assert set(container_ports.values()) == listen_ports
    assert {p["port"] for p in service["spec"]["ports"]} == listen_ports
    assert all(p["targetPort"] in container_ports for p in service["spec"]["ports"])
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert "real client IP" in (K8S / "service.yaml").read_text()  # the why, next to the setting

    # The legacy server stays on loopback, on ports the proxy does not hold.
    for listener in config["listener"]:
        host, port = listener["backend"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) not in listen_ports, listener

    # Probes on the metrics port: liveness /healthz, readiness /readyz.
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # Drain fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] > config["shutdown_grace"]

    # The certificate: a Secret from cert-manager, mounted as a directory.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    tls_volume = volumes["tls"]["secret"]
    assert tls_volume["secretName"] == certificate["spec"]["secretName"]
    tls_dir = mounts["tls"]["mountPath"]
    assert config["certificate"][0] == {"cert": f"{tls_dir}/tls.crt", "key": f"{tls_dir}/tls.key"}
    config_path = next(e["value"] for e in proxy["env"] if e["name"] == "MAIL_TLS_PROXY_CONFIG")
    assert config_path == f"{mounts['config']['mountPath']}/config.toml"
    assert volumes["config"]["configMap"]["name"] == k8s_object("ConfigMap")["metadata"]["name"]

    # Non-root, and ports below 1024 through the pod's sysctl.
    assert proxy["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["runAsUser"] == 65532
    sysctls = {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]}
    assert sysctls["net.ipv4.ip_unprivileged_port_start"] == "0"
    assert pod["securityContext"]["fsGroup"] == 65532

    # Resources are set, with the measurement they come from next to them.
    assert proxy["resources"]["requests"]["memory"] and proxy["resources"]["limits"]["memory"]
    assert "measure_resources.py" in (K8S / "deployment.yaml").read_text()

    # Prometheus Operator scrapes the port named metrics on these pods.
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()


def test_kubernetes_proxy_configuration_passes_check():
    binary = debug_binary()
    text, _ = sidecar_config()
    scratch = REPO_ROOT / "target" / "k8s-check"
    chain, key = new_certificate(scratch / "tls")
    config = scratch / "config.toml"
    config.write_text(text.replace("/etc/mail-tls-proxy/tls/tls.crt", str(chain))
                      .replace("/etc/mail-tls-proxy/tls/tls.key", str(key)))
    result = run([str(binary), "check"], env={**os.environ, "MAIL_TLS_PROXY_CONFIG": str(config)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("listener ")]) == 7, result.stdout


# -- Kubernetes front tier (deploy/kubernetes/front-tier/) -------------------------------

FRONT = K8S / "front-tier"
TICKET_KEY_BYTES = 80


def front_objects() -> list[tuple[Path, dict]]:
    objects = []
    for path in sorted(FRONT.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects += [(path, document) for document in yaml.safe_load_all(path.read_text()) if document]
    return objects


def front_object(kind: str) -> dict:
    matches = [obj for _, obj in front_objects() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in the front tier, found {len(matches)}"
    return matches[0]


def front_config() -> tuple[str, dict]:
    text = front_object("ConfigMap")["data"]["config.toml"]
    return text, tomllib.loads(text)


def front_ticket_secret() -> dict:
    secrets = [obj for _, obj in front_objects() if obj["kind"] == "Secret"]
    assert len(secrets) == 1, secrets
    return secrets[0]


def is_ticket_key(line: str) -> bool:
    try:
        return len(base64.b64decode(line, validate=True)) == TICKET_KEY_BYTES
    except ValueError:
        return False


def test_front_tier_manifests_validate_against_the_kubernetes_schemas():
    need("kubernetes-validate")
    files = sorted({str(path) for path, _ in front_objects()})
    result = run(["kubernetes-validate", "--strict", *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(front_objects()), result.stdout
    kinds = sorted(obj["kind"] for _, obj in front_objects())
    assert kinds == sorted(["ConfigMap", "CronJob", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                            "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service",
                            "ServiceAccount"]), kinds


def test_front_tier_kustomization_applies_everything_but_the_ticket_key_secret():
    """`kubectl apply -k` must never reset the live, rotated ticket keys to
    the placeholder."""
    kustomization = yaml.safe_load((FRONT / "kustomization.yaml").read_text())
    files = {path.name for path in FRONT.glob("*.yaml")} - {"kustomization.yaml", "ticket-keys-secret.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    result = run([need("kubectl"), "kustomize", str(FRONT)])
    assert result.returncode == 0, result.stderr
    rendered = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    assert "Secret" not in {obj["kind"] for obj in rendered}
    assert len(rendered) == len(front_objects()) - 1


def test_front_tier_pieces_fit_together():
    text, config = front_config()
    deployment = front_object("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (proxy,) = pod["containers"]
    service = front_object("Service")

    # Listeners: container ports, published by the Service on the mail ports.
    listen_ports = {listener["name"]: int(listener["listen"].rsplit(":", 1)[1]) for listener in config["listener"]}
    container_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert container_ports.pop("metrics") == int(config["metrics"]["listen"].rsplit(":", 1)[1])
    assert container_ports == listen_ports
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(listen_ports)
    assert {p["port"] for p in service["spec"]["ports"]} == {25, 465, 587, 993, 995, 143, 110}
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["selector"].items() <= labels.items()

    # The load balancer sends PROXY v2 and every listener trusts it from the
    # balancer's addresses only; both ends, with the why next to them.
    annotations = service["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] == "ip"
    assert "preserve_client_ip.enabled=false" in annotations[
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] == "/readyz"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"] == \
        str(container_ports.get("metrics", 9464))
    for listener in config["listener"]:
        trusted = listener.get("accept_proxy_from", [])
        assert trusted and "0.0.0.0/0" not in trusted, listener["name"]
        assert listener.get("client_identity") in ("proxy-v2", "xclient"), listener["name"]
        assert listener.get("relay_check", "refuse") == "refuse", listener["name"]
    service_text = (FRONT / "service.yaml").read_text()
    for other_cloud in ("do-loadbalancer-enable-proxy-protocol", "load-balancer.hetzner.cloud/uses-proxyprotocol",
                        "linode-loadbalancer-default-proxy-protocol", "accept_proxy_from = []"):
        assert other_cloud in service_text, other_cloud
    assert "accept_proxy_from" in (FRONT / "configmap.yaml").read_text().split("apiVersion:")[0]

    # Probes, drain timing.
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    pre_stop = proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["shutdown_grace"]

    # Every Secret (certificate, ticket keys) and the ConfigMap mounted as
    # directories, and the configuration names files inside them.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert set(mounts) == set(volumes) == {"config", "tls", "tickets"}
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    assert all(m["readOnly"] is True for m in mounts.values())
    assert volumes["config"]["configMap"]["name"] == front_object("ConfigMap")["metadata"]["name"]
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["MAIL_TLS_PROXY_CONFIG"] == f"{mounts['config']['mountPath']}/config.toml"
    tls_dir = mounts["tls"]["mountPath"]
    assert config["certificate"][0] == {"cert": f"{tls_dir}/tls.crt", "key": f"{tls_dir}/tls.key"}
    secret = front_ticket_secret()
    assert volumes["tickets"]["secret"]["secretName"] == secret["metadata"]["name"]
    (data_key,) = secret["stringData"]
    assert config["tls"]["ticket_keys"] == f"{mounts['tickets']['mountPath']}/{data_key}"
    # The placeholder is not a key anyone could end up using.
    assert not any(is_ticket_key(line) for line in secret["stringData"][data_key].splitlines())
    assert "openssl rand 80 | base64 -w0" in (FRONT / "ticket-keys-secret.yaml").read_text()
    assert "openssl rand 80 | base64 -w0" in (FRONT / "README.md").read_text()

    # A fleet: replicas owned by the HPA (on CPU, so the CPU request must be
    # set), at most one down voluntarily, spread over nodes.
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = front_object("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert proxy["resources"]["requests"]["cpu"] and proxy["resources"]["requests"]["memory"]
    assert "cpu" not in proxy["resources"].get("limits", {})
    pdb = front_object("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (anti,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]

    # The sidecar's container hardening.
    context = proxy["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 65532
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["fsGroup"] == 65532

    # Only the proxies reach the backend's ports, which are the ones configured.
    policy = front_object("NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    backend_ports = {int(listener["backend"].rsplit(":", 1)[1]) for listener in config["listener"]}
    assert {p["port"] for p in rule["ports"]} == backend_ports
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


def test_front_tier_ticket_rotation_is_limited_to_the_one_secret():
    secret_name = front_ticket_secret()["metadata"]["name"]
    role, binding = front_object("Role"), front_object("RoleBinding")
    account, cronjob = front_object("ServiceAccount"), front_object("CronJob")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret_name],
                              "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["restartPolicy"] == "OnFailure"
    containers = pod["initContainers"] + pod["containers"]
    assert [c["name"] for c in containers] == ["read", "rotate", "write"]
    for container in containers:
        image, _, tag = container["image"].rpartition(":")
        assert image and tag and tag != "latest", container["image"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert containers[0]["image"].startswith("bitnami/kubectl:")
    assert containers[1]["image"] == front_object("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert containers[1]["args"][:4] == ["tickets", "rotate", "--file", "/work/ticket-keys"]
    write = containers[2]["command"][-1]
    assert f"kubectl create secret generic {secret_name}" in write
    assert "--dry-run=client -o yaml" in write and "| kubectl apply -f -" in write


def test_front_tier_configuration_passes_check_and_refuses_the_placeholder(tmp_path):
    binary = debug_binary()
    text, config = front_config()
    chain, key = new_certificate(tmp_path / "tls")
    keys = tmp_path / "ticket-keys"
    keys.write_text(base64.b64encode(os.urandom(TICKET_KEY_BYTES)).decode() + "\n")
    # The backend by address (no cluster DNS here); nothing listens there, so
    # the relay guard cannot tell, which never stops check.
    text = (text.replace("/etc/mail-tls-proxy/tls/tls.crt", str(chain))
            .replace("/etc/mail-tls-proxy/tls/tls.key", str(key))
            .replace(config["tls"]["ticket_keys"], str(keys))
            .replace('"mail-backend:', '"127.0.0.1:'))
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)
    result = run([str(binary), "check", "--config", str(config_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("listener ")]) == 7, result.stdout
    # The Secret's placeholder is refused, naming the file.
    secret = front_ticket_secret()
    keys.write_text(next(iter(secret["stringData"].values())))
    result = run([str(binary), "check", "--config", str(config_file)])
    assert result.returncode == 78, result.stdout + result.stderr
    assert str(keys) in result.stderr, result.stderr


def test_front_tier_ticket_rotation_job_steps_run_against_a_stand_in_api_server(tmp_path):
    """The CronJob's three containers, in order, on this machine: the real
    kubectl for `create secret --dry-run=client -o yaml`, a stand-in for
    `kubectl get` and `kubectl apply` holding the Secret in a file, and the
    real `mail-tls-proxy tickets rotate`."""
    binary = debug_binary()
    kubectl = need("kubectl")
    bash = need("bash")
    secret_name = front_ticket_secret()["metadata"]["name"]
    work = tmp_path / "work"
    work.mkdir()
    state = tmp_path / "secret.json"
    first_key = base64.b64encode(os.urandom(TICKET_KEY_BYTES)).decode()
    state.write_text(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret_name},
                                 "data": {"ticket-keys": base64.b64encode(f"{first_key}\n".encode()).decode()}}))
    calls = tmp_path / "calls"
    stand_in = tmp_path / "bin" / "kubectl"
    stand_in.parent.mkdir()
    stand_in.write_text(f"""#!{sys.executable}
import json, re, subprocess, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[0] == "create":
    sys.exit(subprocess.run([{kubectl!r}, *args]).returncode)
secret = json.load(open({str(state)!r}))
if args[:2] == ["get", "secret"]:
    assert args[2] == secret["metadata"]["name"], args
    key = re.fullmatch(r"\\{{\\.data\\.([\\w-]+)\\}}", args[args.index("-o") + 1].split("=", 1)[1]).group(1)
    sys.stdout.write(secret["data"][key])
elif args[:3] == ["apply", "-f", "-"]:
    import yaml
    applied = yaml.safe_load(sys.stdin)
    assert applied["metadata"]["name"] == secret["metadata"]["name"], applied
    json.dump(applied, open({str(state)!r}, "w"))
else:
    sys.exit("unexpected: " + " ".join(args))
""")
    stand_in.chmod(0o755)
    pod = front_object("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    read, rotate = pod["initContainers"]
    (write,) = pod["containers"]
    environment = {**os.environ, "PATH": f"{stand_in.parent}:{os.environ['PATH']}", "HOME": str(work)}

    def run_job() -> list[str]:
        for container in (read, rotate, write):
            here = [part.replace("/work/", f"{work}/") for part in container.get("command") or container["args"]]
            if "command" in container:  # the kubectl image: bash -c SCRIPT
                command = [bash, *here[1:]]
            else:  # the proxy image, whose entrypoint is the binary
                command = [str(binary), *here]
            result = run(command, env=environment)
            assert result.returncode == 0, (container["name"], result.stdout + result.stderr)
        data = json.loads(state.read_text())["data"]["ticket-keys"]
        return base64.b64decode(data).decode().splitlines()

    keys = run_job()
    assert len(keys) == 2 and keys[0] == first_key and all(is_ticket_key(k) for k in keys), keys
    keys = run_job()
    assert len(keys) == 3 and keys[0] == first_key
    third = run_job()
    assert len(third) == 3 and third[:2] == keys[1:] and third[2] not in keys, third
    # What it asked of the API server: reads and applies of that one Secret.
    verbs = [line.split()[0] for line in calls.read_text().splitlines()]
    assert set(verbs) == {"get", "create", "apply"}, verbs



# -- the sidecar's configuration, run: readiness, login, Secret-style rotation -------


class SecretVolume:
    """A directory laid out as kubelet lays out a Secret volume: the files are
    symlinks through ..data, which points at a timestamped directory; an
    update writes a new directory and swaps ..data with one rename."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.generation = 0

    def publish(self, chain: Path, key: Path) -> None:
        self.generation += 1
        version = self.root / f"..2025_01_0{self.generation}_00_00_00.{self.generation}"
        version.mkdir()
        shutil.copy(chain, version / "tls.crt")
        shutil.copy(key, version / "tls.key")
        new_link = self.root / "..data_tmp"
        new_link.symlink_to(version.name)
        os.replace(new_link, self.root / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def der_of(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


@pytest.fixture(scope="module")
def sidecar_proxy(mail_servers, scratch_dir):
    """The ConfigMap's configuration run in front of the real Dovecot and
    Postfix: free loopback ports instead of 25/465/..., the test servers'
    ports as the backends, the certificate from a Secret-style directory,
    and two listeners given tight limits so the test can trip them."""
    binary = debug_binary()
    text, config = sidecar_config()
    base = scratch_dir / "sidecar"
    volume = SecretVolume(base / "tls")
    first = new_certificate(base / "cert-1")
    volume.publish(*first)
    names = [listener["name"] for listener in config["listener"]]
    *ports, metrics_port = pick_free_loopback_ports(len(names) + 1)
    ports = dict(zip(names, ports))
    backend = {"smtp": mail_servers.smtp_port, "imap": mail_servers.imap_port, "pop3": mail_servers.pop3_port}

    def backend_port(listener: dict) -> int:
        # The legacy server as the ConfigMap's comments describe it: its SMTP
        # services expect the PROXY header the listeners send.
        identity = listener.get("client_identity", "none")
        if listener["protocol"] == "smtp" and identity == "proxy-v2":
            return mail_servers.extra_ports["smtp_haproxy"]
        assert identity == "none", listener
        return backend[listener["protocol"]]

    lines, current = [], None
    for line in text.splitlines():
        if m := re.match(r'name\s*=\s*"([^"]+)"', line):
            current = next(l for l in config["listener"] if l["name"] == m.group(1))
        if line.startswith("listen") and "9464" in line:
            line = f'listen = "127.0.0.1:{metrics_port}"'
        elif line.startswith("listen"):
            line = f'listen   = "127.0.0.1:{ports[current["name"]]}"'
        elif line.startswith("backend"):
            line = f'backend  = "127.0.0.1:{backend_port(current)}"'
            if current["name"] == "pop3s":
                line += "\nhandshake_timeout = 1"
            if current["name"] == "pop3":
                line += "\nmax_connections_per_ip = 1"
        lines.append(line.replace("/etc/mail-tls-proxy/tls", str(volume.root)))
    config_file = base / "config.toml"
    config_file.write_text("\n".join(lines) + "\n")
    log_file = base / "proxy.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "--log-format", "json", "run"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MAIL_TLS_PROXY_CONFIG": str(config_file), "MAIL_TLS_PROXY_LOG": "info"})
    metrics = f"http://127.0.0.1:{metrics_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if http_get(f"{metrics}/healthz")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None, tail_of_file(log_file)
        assert time.monotonic() < deadline, tail_of_file(log_file)
        time.sleep(0.1)
    yield {"process": process, "ports": ports, "metrics": metrics, "volume": volume, "first": first,
           "base": base, "log": log_file, "config": config}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_sidecar_is_ready_only_when_every_backend_greets(sidecar_proxy):
    status, body = http_get(f"{sidecar_proxy['metrics']}/readyz")
    assert (status, body) == (200, "ready\n")
    _, text = http_get(f"{sidecar_proxy['metrics']}/metrics")
    for name in sidecar_proxy["ports"]:
        assert f'mail_tls_proxy_backend_up{{listener="{name}"}} 1' in text, text


def test_sidecar_serves_an_imaps_login_with_the_secret_volume_certificate(sidecar_proxy, mail_servers):
    import imaplib
    chain, _ = sidecar_proxy["first"]
    context = ssl.create_default_context(cafile=str(chain))
    client = imaplib.IMAP4_SSL("localhost", sidecar_proxy["ports"]["imaps"], ssl_context=context, timeout=20)
    try:
        assert client.login(mail_servers.user, mail_servers.password)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_sidecar_serves_a_renewed_secret_without_restart(sidecar_proxy):
    port = sidecar_proxy["ports"]["imaps"]
    assert served_certificate(port) == der_of(sidecar_proxy["first"][0])
    _, before = http_get(f"{sidecar_proxy['metrics']}/metrics")
    reloads_before = float(re.search(r'^mail_tls_proxy_certificate_reloads_total\{result="ok"\} (\S+)',
                                     before, re.M).group(1))
    second = new_certificate(sidecar_proxy["base"] / "cert-2")
    sidecar_proxy["volume"].publish(*second)  # what kubelet does after cert-manager renews
    deadline = time.monotonic() + 10
    while served_certificate(port) != der_of(second[0]):
        assert time.monotonic() < deadline, tail_of_file(sidecar_proxy["log"])
        time.sleep(0.2)
    _, after = http_get(f"{sidecar_proxy['metrics']}/metrics")
    reloads_after = float(re.search(r'^mail_tls_proxy_certificate_reloads_total\{result="ok"\} (\S+)',
                                    after, re.M).group(1))
    assert reloads_after >= reloads_before + 1
    assert sidecar_proxy["process"].poll() is None


def test_sidecar_logs_are_json_lines_with_connection_fields(sidecar_proxy):
    # One connection that fails its handshake: logged inside its span.
    with socket.create_connection(("127.0.0.1", sidecar_proxy["ports"]["imaps"]), timeout=5) as sock:
        sock.sendall(b"this is not TLS\r\n" * 4)
        sock.settimeout(5)
        try:
            sock.recv(100)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in sidecar_proxy["log"].read_text().splitlines() if line.strip()]
        connection = [r for r in records if {"listener", "peer", "connection_id"} <= r.keys()]
        if connection or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all({"timestamp", "level", "message", "target"} <= r.keys() for r in records)
    assert any(r["message"] == "listening" and r.get("listener") == "imaps" for r in records)
    assert connection, records[-5:]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", connection[0]["timestamp"])


def trip_every_counter(proxy: dict) -> None:
    """Makes the proxy count at least once everything a dashboard or alert
    looks at, so each series exists in the scrape."""
    ports = proxy["ports"]
    # A failed handshake (handshake errors by reason).
    with socket.create_connection(("127.0.0.1", ports["imaps"]), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        sock.settimeout(5)
        try:
            while sock.recv(100):
                pass
        except OSError:
            pass
    # A policy refusal (AUTH before STARTTLS on submission), then STARTTLS.
    import smtplib
    client = smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10)
    client.ehlo("client.example")
    code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")
    assert code == 530, code
    context = ssl.create_default_context(cafile=str(proxy["first"][0]))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo("client.example")
    client.quit()
    # A handshake timeout (handshake_timeout = 1 on pop3s).
    with socket.create_connection(("127.0.0.1", ports["pop3s"]), timeout=5) as sock:
        sock.settimeout(5)
        try:
            sock.recv(100)
        except OSError:
            pass
    # A connection over the per-address limit (max_connections_per_ip = 1 on pop3).
    with socket.create_connection(("127.0.0.1", ports["pop3"]), timeout=5) as held:
        held.recv(100)
        with socket.create_connection(("127.0.0.1", ports["pop3"]), timeout=5) as refused:
            refused.settimeout(5)
            assert refused.recv(100).startswith(b"-ERR")


def test_dashboard_and_alerts_use_only_metrics_a_running_proxy_exports(sidecar_proxy):
    trip_every_counter(sidecar_proxy)
    assert http_get(f"{sidecar_proxy['metrics']}/readyz")[0] == 200
    _, text = http_get(f"{sidecar_proxy['metrics']}/metrics")
    exported = scraped_metric_names(text)
    used_by_dashboard = metric_names_in(dashboard_expressions())
    used_by_alerts = metric_names_in([rule["expr"] for rule in alert_rules()])
    assert used_by_dashboard - exported == set(), sorted(exported)
    assert used_by_alerts - exported == set(), sorted(exported)
    # And the dashboard shows every family the proxy exports.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported if name.startswith("mail_tls_proxy_")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used_by_dashboard}
    assert families - shown == set()
    # The operations guide documents each of them.
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert [family for family in sorted(families) if f"`{family}`" not in operations] == []


# -- Grafana -------------------------------------------------------------------------------------


def test_dashboard_is_well_formed_and_covers_what_operators_watch():
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in ("connections accepted per listener", "tls handshakes per listener", "errors by reason",
                  "starttls upgrades vs sessions that stayed plaintext", "bytes", "days to expiry",
                  "certificate reloads", "policy refusals"):
        assert topic in titles, topic
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "instance", "listener"}


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = need("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}",
         "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$listener", ".*")}
        for index, expr in enumerate(dashboard_expressions())]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Prometheus ----------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    promtool = shutil.which("promtool")
    if promtool is None and not RUNNING_IN_CI:
        # The schema, by hand: groups of rules, each alert with an expression.
        for rule in alert_rules():
            assert rule["alert"] and rule["expr"] and rule["labels"]["severity"] in ("warning", "critical")
        pytest.skip("promtool not installed; only the rule structure was checked")
    result = run([need("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_alerts_fire_when_they_should_promtool_unit_tests():
    result = run([need("promtool"), "test", "rules", "alerts-test.yaml"], cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_cover_expiry_reload_handshakes_backend_readiness_and_relaying():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert "14 * 86400" in rules["MailTlsProxyCertificateExpiresSoon"]["expr"]
    assert rules["MailTlsProxyCertificateExpiresSoon"]["labels"]["severity"] == "warning"
    assert "3 * 86400" in rules["MailTlsProxyCertificateExpiresVerySoon"]["expr"]
    assert rules["MailTlsProxyCertificateExpiresVerySoon"]["labels"]["severity"] == "critical"
    assert 'result="error"' in rules["MailTlsProxyCertificateReloadFailing"]["expr"]
    assert "tls_handshakes_total" in rules["MailTlsProxyHandshakeErrorRatioHigh"]["expr"]
    assert "backend_up" in rules["MailTlsProxyBackendUnavailable"]["expr"]
    assert "up{" in rules["MailTlsProxyNoReadyEndpoint"]["expr"]
    open_relay = rules["MailTlsProxyOpenRelay"]
    assert open_relay["expr"] == 'mail_tls_proxy_relay_check{result="open"} == 1'
    assert open_relay["labels"]["severity"] == "critical" and "for" not in open_relay
    for fix in ("client_identity", "smtpd_upstream_proxy_protocol", "mynetworks", "relay_from_hosts"):
        assert fix in open_relay["annotations"]["description"], fix
    unknown = rules["MailTlsProxyRelayCheckUnknown"]
    assert unknown["expr"] == 'mail_tls_proxy_relay_check{result="unknown"} == 1'
    assert unknown["labels"]["severity"] == "warning" and unknown["for"] == "2h"


# -- Compose -------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification():
    checker = need("check-jsonschema")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = REPO_ROOT / "target" / "compose-broken.yaml"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("restart: unless-stopped", "restrat: no", 1))
    assert run([checker, "--builtin-schema", "vendor.compose-spec", str(broken)]).returncode != 0


def test_compose_stack_pieces_fit_together():
    services = compose()["services"]
    assert set(services) == {"mail", "mail-tls-proxy", "prometheus"}
    proxy = services["mail-tls-proxy"]
    config = tomllib.loads((DEPLOY / "compose" / "mail-tls-proxy.toml").read_text())
    # Every file or directory the stack mounts or builds from exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = DEPLOY / source
                assert path.exists() or path.name == "certs", volume
    assert (DEPLOY / services["mail"]["build"] / "Dockerfile").is_file()
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    # The proxy fronts the mail service; the mail service publishes nothing.
    assert {listener["backend"].split(":")[0] for listener in config["listener"]} == {"mail"}
    assert "ports" not in services["mail"]
    published = {int(p.split(":")[-1]) for p in proxy["ports"]}
    assert {int(l["listen"].rsplit(":", 1)[1]) for l in config["listener"]} | {9464} == published
    # Prometheus scrapes the proxy's metrics port and loads the alerts.
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"mail-tls-proxy:{config['metrics']['listen'].rsplit(':', 1)[1]}"
    assert prometheus["rule_files"] == ["alerts.yaml"]
    assert any(v.endswith("/etc/prometheus/alerts.yaml:ro") for v in services["prometheus"]["volumes"])
    # Docker's stop timeout covers the drain.
    assert int(proxy["stop_grace_period"].rstrip("s")) > config["shutdown_grace"]


def test_compose_configurations_pass_their_own_tools(tmp_path):
    # mail-tls-proxy's own configuration.
    binary = debug_binary()
    new_certificate(tmp_path / "etc" / "tls")
    shutil.copy(DEPLOY / "compose" / "mail-tls-proxy.toml", tmp_path / "etc" / "config.toml")
    result = run([str(binary), "check", "--config", str(tmp_path / "etc" / "config.toml")])
    assert result.returncode == 0, result.stdout + result.stderr
    # Dovecot's and Postfix's, with the very programs the image installs.
    dovecot = DEPLOY / "compose" / "mail" / "dovecot.conf"
    result = run([need("doveconf"), "-n", "-c", str(dovecot)])
    assert result.returncode == 0 and not result.stderr, result.stderr
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    for name in ("main.cf", "master.cf"):
        shutil.copy(DEPLOY / "compose" / "mail" / name, postfix_dir / name)
    postconf = need("postconf")
    for flag in ("-n", "-M"):
        result = run([postconf, "-c", str(postfix_dir), flag])
        assert result.returncode == 0 and not result.stderr, result.stderr
    # Prometheus' configuration (and the alerts it loads).
    for name, source in (("prometheus.yml", DEPLOY / "compose" / "prometheus.yml"),
                         ("alerts.yaml", DEPLOY / "prometheus" / "alerts.yaml")):
        shutil.copy(source, tmp_path / name)
    result = run([need("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint():
    hadolint = need("hadolint")
    for dockerfile in (DEPLOY / "Dockerfile", DEPLOY / "compose" / "mail" / "Dockerfile"):
        result = run([hadolint, str(dockerfile)])
        assert result.returncode == 0, f"{dockerfile}:\n{result.stdout}{result.stderr}"


# -- systemd -------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "mail-tls-proxy.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the built binary (verify insists
    that the program exists)."""
    unit = tmp_path / "mail-tls-proxy.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mail-tls-proxy", str(debug_binary())))
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = need("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    result = run([analyze, "verify", str(unit)])
    # verify only warns (exit 0) about unknown keys: any output is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # Every command line is checked, ExecStartPre and ExecReload too.
    missing = tmp_path / "missing.service"
    missing.write_text(unit.read_text().replace(f"ExecStartPre={debug_binary()}", "ExecStartPre=/nonexistent/check"))
    assert "/nonexistent/check" in run([analyze, "verify", str(missing)]).stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key" in run([analyze, "verify", str(broken)]).stderr


def test_systemd_unit_is_a_notify_service_that_checks_before_start_and_reload():
    settings = unit_settings()
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    start = settings["ExecStart"][0]
    assert start.startswith("/usr/local/bin/mail-tls-proxy run --config ")
    check = start.replace(" run ", " check ")
    assert settings["ExecStartPre"] == [check]
    # In order; systemd stops at the first that fails.
    assert settings["ExecReload"] == [check, "/bin/kill -HUP $MAINPID"]
    assert settings["WatchdogSec"] == ["30s"]
    assert settings["RestartPreventExitStatus"] == ["78"]


def test_systemd_unit_is_hardened(tmp_path):
    settings = unit_settings()
    assert settings["DynamicUser"] == ["yes"] or "User" in settings
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["ProtectSystem"] == ["strict"] and settings["NoNewPrivileges"] == ["yes"]
    timeout = int(settings["TimeoutStopSec"][0].rstrip("s"))
    assert timeout > 30, "TimeoutStopSec must exceed the default shutdown_grace (30 s)"
    result = run([need("systemd-analyze"), "security", "--offline=yes", str(unit_for_this_machine(tmp_path))])
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert exposure and float(exposure.group(1)) <= 2.0, result.stdout[-3000:]


def free_low_port() -> int:
    for port in (993, 995, 465, 587, 143, 110, 25, 992, 991, 990, 989):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024 on 127.0.0.1")


def test_systemd_unit_commands_run_as_the_unit_runs_them(mail_servers, scratch_dir):
    """ExecStart as an unprivileged uid holding only CAP_NET_BIND_SERVICE
    (what DynamicUser, AmbientCapabilities, CapabilityBoundingSet and
    NoNewPrivileges give it) binds a port below 1024 and serves; ExecReload
    reloads the certificates; KillSignal drains and exits 0 within
    TimeoutStopSec."""
    if os.geteuid() != 0:
        unavailable("needs root to drop to an unprivileged uid like DynamicUser=yes")
    setpriv = need("setpriv")
    binary = debug_binary()
    settings = unit_settings()
    etc = scratch_dir / "systemd-etc"  # pytest's tmp_path is private to root
    chain, key = new_certificate(etc)
    os.chmod(etc, 0o755)
    os.chmod(key, 0o644)  # readable by the dynamic user (the unit's comment says how in production)
    low_port = free_low_port()
    (metrics_port,) = pick_free_loopback_ports(1)
    config = etc / "config.toml"
    ProxyConfig(
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem")],
        metrics_port=metrics_port,
        listeners=[ListenerConfig("imaps", "imap", "implicit", listen_port=low_port,
                                  backend=mail_servers.imap_port)],
    ).write(config)
    exec_start = settings["ExecStart"][0].replace("/usr/local/bin/mail-tls-proxy", str(binary)) \
        .replace("/etc/mail-tls-proxy/config.toml", str(config)).split()
    environment = {key: value for line in settings["Environment"] for key, value in [line.split("=", 1)]}
    uid = 61999  # in systemd's DynamicUser range (61184-65519)
    process = subprocess.Popen(
        [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
         "--inh-caps=-all,+net_bind_service", "--ambient-caps=-all,+net_bind_service",
         "--bounding-set=-all,+net_bind_service", *exec_start],
        env={"PATH": "/usr/bin:/bin", **environment}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while http_get_or_none(f"http://127.0.0.1:{metrics_port}/readyz") != 200:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        status = Path(f"/proc/{process.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status
        assert re.search(r"^CapEff:\s+0000000000000400$", status, re.M), status  # CAP_NET_BIND_SERVICE only
        context = ssl.create_default_context(cafile=str(chain))
        with socket.create_connection(("127.0.0.1", low_port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                assert tls.recv(100).startswith(b"* OK")
        # ExecReload, as systemctl reload runs it: the check, then the signal.
        for line in settings["ExecReload"]:
            reload = line.replace("/usr/local/bin/mail-tls-proxy", str(binary)) \
                .replace("/etc/mail-tls-proxy/config.toml", str(config)).replace("$MAINPID", str(process.pid))
            assert subprocess.run(reload.split(), env={"PATH": "/usr/bin:/bin", **environment},
                                  stdout=subprocess.DEVNULL).returncode == 0, reload
        deadline = time.monotonic() + 10
        while True:
            _, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            if re.search(r'^mail_tls_proxy_config_reloads_total\{result="ok"\} [1-9]', text, re.M):
                break
            assert time.monotonic() < deadline, "SIGHUP did not reload the configuration"
            time.sleep(0.1)
        # KillSignal, then the stop timeout.
        process.send_signal(getattr(signal, settings["KillSignal"][0]))
        assert process.wait(timeout=int(settings["TimeoutStopSec"][0].rstrip("s"))) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def http_get_or_none(url: str) -> int | None:
    try:
        return http_get(url)[0]
    except OSError:
        return None


# -- the container image ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def static_binary() -> Path:
    """A fully static release build (deploy/build-static.sh), reusing target/."""
    if shutil.which("cargo") is None:
        unavailable("cargo is needed to build the static binary")
    result = run(["sh", str(DEPLOY / "build-static.sh"), str(STATIC_DIR)], cwd=REPO_ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return STATIC_DIR / "mail-tls-proxy"


@pytest.fixture
def podman_ready():
    if shutil.which("podman") is None or shutil.which("runc") is None:
        unavailable("podman and runc are not installed (CI=true installs them)")
    if os.geteuid() != 0:
        unavailable("the container test runs podman as root")


def test_container_image_serves_imaps_through_podman(podman_ready, static_binary, mail_servers,
                                                     test_certificate, tmp_path):
    result = run(["bash", str(E2E / "container-test.sh"), str(static_binary), str(mail_servers.imap_port),
                  str(test_certificate.chain.parent), str(tmp_path / "container")], timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for step in ("HEALTHCHECK passed", "IMAPS login and SELECT INBOX OK", "with listener/peer/connection_id",
                 "drains and exits 0", "passed"):
        assert step in output, output[-6000:]


@pytest.fixture(scope="session")
def static_bench_backend() -> Path:
    """The benchmark's plaintext backend, static: the legacy server's
    stand-in in the Kubernetes pod (a scratch image has nothing else)."""
    target = f"{os.uname().machine}-unknown-linux-gnu"
    result = run(["cargo", "build", "--release", "--locked", "--target", target, "-p", "mail-tls-bench",
                  "--bin", "bench-backend"], cwd=REPO_ROOT, timeout=1800,
                 env={**os.environ, "RUSTFLAGS": os.environ.get("RUSTFLAGS", "") + " -C target-feature=+crt-static"})
    assert result.returncode == 0, result.stderr[-5000:]
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    return (target_dir if target_dir.is_absolute() else REPO_ROOT / target_dir) / target / "release" / "bench-backend"


def test_kubernetes_pod_runs_under_podman_kube_play(podman_ready, static_binary, static_bench_backend, tmp_path):
    """The Deployment and ConfigMap as written, run as a pod (see
    tests/e2e/kube-play-test.sh for the few stand-ins podman 4.3 needs)."""
    need("catatonit")  # podman's pause process for the pod's infra container
    result = run(["bash", str(E2E / "kube-play-test.sh"), str(static_binary), str(static_bench_backend),
                  str(tmp_path / "kube")], timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for step in ("/readyz 200", "relay guard checked the three SMTP listeners' backend, none open",
                 "handshake with the Secret's certificate", "the renewed certificate is served",
                 "uid 65532 and listens on 25", "drains, exit 0", "passed"):
        assert step in output, output[-6000:]


def test_static_binary_needs_no_shared_library(static_binary):
    readelf = need("readelf")
    result = run([readelf, "-d", str(static_binary)])
    assert "NEEDED" not in result.stdout, result.stdout


# -- resources -----------------------------------------------------------------------------------


def test_measured_memory_fits_the_kubernetes_request(static_binary):
    """A short run of tests/e2e/measure_resources.py: the proxy under a small
    load stays within the memory request the Deployment declares."""
    result = run([sys.executable, str(E2E / "measure_resources.py"), str(static_binary),
                  "--idle-sessions", "200", "--rate", "40", "--seconds", "3"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["churn"]["failed"] == 0, figures
    request = proxy_container(k8s_object("Deployment"))["resources"]["requests"]["memory"]
    assert request.endswith("Mi")
    assert figures["churn"]["peak_rss_kib"] < int(request[:-2]) * 1024, figures


# -- documentation ---------------------------------------------------------------------------------


def shipped_proxy_configurations() -> dict[str, str]:
    """Every proxy configuration an operator may copy: the example, the
    deployment files, and the TOML blocks of the README and the backends
    guide."""
    shipped = {
        "examples/quickstart.toml": (REPO_ROOT / "examples" / "quickstart.toml").read_text(),
        "deploy/kubernetes/configmap.yaml": sidecar_config()[0],
        "deploy/compose/mail-tls-proxy.toml": (DEPLOY / "compose" / "mail-tls-proxy.toml").read_text(),
    }
    for document in ("README.md", "docs/backends.md"):
        blocks = re.findall(r"```toml\n(.*?)```", (REPO_ROOT / document).read_text(), re.S)
        shipped.update({f"{document} TOML block {index}": block for index, block in enumerate(blocks, 1)})
    return shipped


def test_shipped_smtp_listeners_tell_the_backend_who_the_client_is():
    """A proxy in front of a server that trusts the proxy's address makes it
    an open relay unless the backend learns each client's address; and the
    relay guard that catches it stays on everywhere."""
    smtp_listeners = 0
    for where, text in shipped_proxy_configurations().items():
        for listener in tomllib.loads(text).get("listener", []):
            if listener["protocol"] != "smtp":
                continue
            smtp_listeners += 1
            assert listener.get("client_identity") in ("proxy-v2", "xclient"), (where, listener["name"])
            assert listener.get("relay_check", "refuse") == "refuse", (where, listener["name"])
    assert smtp_listeners >= 12, smtp_listeners
    # Compose's Postfix expects the header on both services the proxy uses.
    master = (DEPLOY / "compose" / "mail" / "master.cf").read_text()
    services = re.findall(r"^(smtp|submission)\s+inet\b.*\n((?:[ \t]+-o .*\n)*)", master, re.M)
    assert [name for name, _ in services] == ["smtp", "submission"], services
    assert all("-o smtpd_upstream_proxy_protocol=haproxy" in options for _, options in services), services


def test_readme_deploy_section_links_every_artifact():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Deploy", 1)[1].split("\n## ", 1)[0]
    links = set(re.findall(r"\]\(((?:deploy|docs)/[^)]+)\)", section))
    for artifact in ("deploy/Dockerfile", "deploy/kubernetes", "deploy/compose.yaml",
                     "deploy/systemd/mail-tls-proxy.service", "deploy/grafana/mail-tls-proxy.json",
                     "deploy/prometheus/alerts.yaml", "docs/operations.md"):
        assert artifact in links, artifact
    for link in links:
        path, _, anchor = link.partition("#")
        assert (REPO_ROOT / path).exists(), link
        if anchor:
            assert anchor in _heading_anchors((REPO_ROOT / path).read_text()), link
    assert section.count("```sh") >= 5


def _heading_anchors(markdown):
    """The anchors a Markdown renderer gives the headings of `markdown`."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_operations_guide_documents_every_metric_the_code_defines():
    source = (REPO_ROOT / "src" / "metrics.rs").read_text()
    defined = set(re.findall(r'"(mail_tls_proxy_[a-z0-9_]+)"', source))
    assert len(defined) >= 15
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert sorted(name for name in defined if f"`{name}`" not in operations) == []
    for topic in ("## Certificate rotation", "cert-manager", "certbot", "acme.sh", "no reload hook",
                  "## Metrics reference", "## Logs", "## Signals", "SIGHUP", "SIGTERM", "SIGINT", "## Upgrades"):
        assert topic in operations, topic
