"""Policy checks over rendered Kubernetes manifests: the ones a policy linter runs.

kube-linter is not published on the registries this project installs from (PyPI, npm,
Debian), so ``make deploy-check`` runs this set instead: the checks of kube-linter's
default set that apply to these manifests, under kube-linter's names, plus a few of our
own (marked "cuga"). Each finding is one line ``<kind>/<name>: <check>: <problem>``.

``check(docs)`` takes every object of one rendered overlay (``kubectl kustomize``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

Doc = Mapping[str, Any]

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
#: Environment variable names that must never carry a literal value (kube-linter's
#: env-var-secret); ``..._FILE`` variables name a mounted file and are fine.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|PRIVATE_KEY|(^|_)KEY$|DSN$")
#: Key usages cert-manager accepts (cert-manager.io/v1 KeyUsage).
_USAGES = {
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
}


def _name(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _pod(doc: Doc) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def _workloads(docs: list[Doc]) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] in WORKLOADS)


def _container_checks(where: str, pod: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    out = []
    who = f"{where} container {c['name']}"
    pod_sc = pod.get("securityContext", {})
    sc = c.get("securityContext", {})
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if not non_root and not (isinstance(user, int) and user > 0):
        out.append(f"{who}: run-as-non-root: neither runAsNonRoot nor a non-zero runAsUser")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{who}: no-read-only-root-fs: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{who}: privilege-escalation-container: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        out.append(f"{who}: privileged-container: privileged")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        out.append(f"{who}: drop-net-raw-capability: capabilities.drop lacks ALL")
    resources = c.get("resources", {})
    for kind, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        if key not in resources.get(kind, {}):
            check = "unset-cpu-requirements" if key == "cpu" else "unset-memory-requirements"
            out.append(f"{who}: {check}: no {kind}.{key}")
    image = str(c.get("image", ""))
    tagged = "@sha256:" in image or ":" in image.rsplit("/", 1)[-1]
    if not tagged or image.endswith(":latest"):
        out.append(f"{who}: latest-tag: image {image!r} has no fixed tag or digest")
    ports = {p.get("name") for p in c.get("ports", [])} | {
        p["containerPort"] for p in c.get("ports", [])
    }
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in c:
            check = "no-readiness-probe" if probe == "readinessProbe" else "no-liveness-probe"
            out.append(f"{who}: {check}: no {probe}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = c.get(probe, {})
        for kind in ("grpc", "httpGet", "tcpSocket"):
            port = handler.get(kind, {}).get("port")
            if port is not None and port not in ports:
                out.append(f"{who}: probe-port (cuga): {probe} uses port {port!r}, not declared")
    for var in c.get("env", []):
        literal = "value" in var and var["value"] not in ("", None)
        if literal and _SECRET_NAME.search(var["name"]) and not var["name"].endswith("_FILE"):
            out.append(f"{who}: env-var-secret: {var['name']} has a literal value")
    return out


def _pod_checks(doc: Doc, docs: list[Doc]) -> list[str]:
    where = _name(doc)
    out = []
    pod = _pod(doc)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            check = {"hostNetwork": "host-network", "hostPID": "host-pid", "hostIPC": "host-ipc"}
            out.append(f"{where}: {check[key]}: {key} is true")
    account = pod.get("serviceAccountName", "default")
    if account == "default":
        out.append(f"{where}: default-service-account: runs as the namespace's default account")
    elif not [
        d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account
    ]:
        out.append(f"{where}: non-existent-service-account: {account} is not defined")
    if pod.get("automountServiceAccountToken") is not False:
        out.append(f"{where}: automount-service-account-token (cuga): API token mounted")
    if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        out.append(f"{where}: seccomp (cuga): no RuntimeDefault seccomp profile")
    selector = doc["spec"].get("selector", {}).get("matchLabels", {})
    labels = doc["spec"]["template"]["metadata"].get("labels", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        out.append(f"{where}: mismatching-selector: selector {selector} vs labels {labels}")
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in pod.get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
    for missing in sorted(mounts - volumes):
        out.append(f"{where}: volume (cuga): mounts {missing}, which is no volume")
    for c in pod["containers"]:
        out.extend(_container_checks(where, pod, c))
    return out


def _services(docs: list[Doc]) -> list[str]:
    out = []
    pods = [d["spec"]["template"]["metadata"].get("labels", {}) for d in _workloads(docs)]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        if selector and not any(all(p.get(k) == v for k, v in selector.items()) for p in pods):
            out.append(f"{_name(svc)}: dangling-service: selector {selector} matches no pod")
    return out


def _scaling(docs: list[Doc]) -> list[str]:
    out = []
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in _workloads(docs)}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = workloads.get((ref["kind"], ref["name"]))
        if target is None:
            out.append(f"{_name(hpa)}: hpa-target (cuga): {ref['kind']}/{ref['name']} not found")
        elif "replicas" in target["spec"]:
            out.append(
                f"{_name(target)}: hpa-replicas (cuga): spec.replicas is set while"
                f" {_name(hpa)} scales it (every apply resets the count)"
            )
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            w
            for w in workloads.values()
            if all(
                w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
        ]
        if not matched:
            out.append(f"{_name(pdb)}: dangling-pdb (cuga): selects no workload")
        minimum = pdb["spec"].get("minAvailable")
        for w in matched:
            replicas = w["spec"].get("replicas")
            if isinstance(minimum, int) and isinstance(replicas, int) and minimum >= replicas:
                out.append(
                    f"{_name(pdb)}: pdb-min-available: minAvailable {minimum} >= {replicas}"
                    f" replicas of {_name(w)}: no pod can ever be evicted"
                )
    return out


def _certificates(docs: list[Doc]) -> list[str]:
    """cert-manager objects, which no Kubernetes schema covers: the fields they need, the
    issuers they name, and every ``cuga-tls-*`` Secret a pod mounts having its issuer."""
    out = []
    issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
    produced = set()
    for cert in (d for d in docs if d["kind"] == "Certificate"):
        where = _name(cert)
        spec = cert.get("spec", {})
        if cert.get("apiVersion") != "cert-manager.io/v1":
            out.append(f"{where}: certificate (cuga): apiVersion is not cert-manager.io/v1")
        if not spec.get("secretName"):
            out.append(f"{where}: certificate (cuga): no secretName")
        produced.add(spec.get("secretName"))
        ref = spec.get("issuerRef", {})
        if ref.get("kind", "Issuer") != "Issuer" or ref.get("name") not in issuers:
            out.append(f"{where}: certificate (cuga): issuer {ref} is not an Issuer here")
        if not spec.get("isCA") and not (spec.get("commonName") or spec.get("dnsNames")):
            out.append(f"{where}: certificate (cuga): neither commonName nor dnsNames")
        unknown = set(spec.get("usages", [])) - _USAGES
        if unknown:
            out.append(f"{where}: certificate (cuga): unknown usages {sorted(unknown)}")
    for issuer in (d for d in docs if d["kind"] == "Issuer"):
        spec = issuer.get("spec", {})
        if len(set(spec) & {"selfSigned", "ca", "vault", "acme", "venafi"}) != 1:
            out.append(f"{_name(issuer)}: issuer (cuga): needs exactly one issuer type")
        if "ca" in spec and spec["ca"].get("secretName") not in produced:
            out.append(f"{_name(issuer)}: issuer (cuga): its CA Secret is made by no Certificate")
    for w in _workloads(docs):
        for volume in _pod(w).get("volumes", []):
            secret = volume.get("secret", {}).get("secretName", "")
            if secret.startswith("cuga-tls-") and secret not in produced:
                out.append(f"{_name(w)}: certificate (cuga): Secret {secret} is issued by nothing")
    return out


def check(docs: list[Doc]) -> list[str]:
    """Every finding over one overlay's objects (empty: the overlay passes)."""
    out: list[str] = []
    for doc in _workloads(docs):
        out.extend(_pod_checks(doc, docs))
    out.extend(_services(docs))
    out.extend(_scaling(docs))
    out.extend(_certificates(docs))
    return out


#: API groups whose kinds no Kubernetes schema covers; :func:`check` covers them.
CHECKED_HERE = ("cert-manager.io/",)
