"""A small Pod Security Standards checker, profile "restricted" (which includes "baseline"),
written from the published standard (kubernetes.io/docs/concepts/security/pod-security-standards,
policy version 1.x). It checks a pod spec and returns the broken rules; tests/operator uses it
on every pod the operator makes KubeRay create, and checks it against known-bad pods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        c
        for key in ("containers", "initContainers", "ephemeralContainers")
        for c in pod.get(key) or []
    ]


def violations(pod: Mapping[str, Any]) -> list[str]:
    """Rules of "restricted" that the pod spec breaks (empty: it is admitted)."""
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = _containers(pod)
    # --- baseline ---
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"host namespaces: {field}")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            found.append(f"hostPath volume {v.get('name')}")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            found.append(f"sysctl {s.get('name')}")
    contexts = [("pod", psc)]
    contexts += [(c.get("name"), c.get("securityContext") or {}) for c in containers]
    for who, sc in contexts:
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get(
            "role"
        ):
            found.append(f"SELinux options of {who}")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"AppArmor profile of {who}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"seccomp Unconfined in {who}")
        if sc.get("runAsUser") == 0:
            found.append(f"runAsUser 0 in {who}")
        if sc.get("runAsNonRoot") is False:
            found.append(f"runAsNonRoot false in {who}")
    for c in containers:
        name, sc = c.get("name"), c.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess in {name}")
        if sc.get("privileged"):
            found.append(f"privileged container {name}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"procMount of {name}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"hostPort in {name}")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if added - BASELINE_CAPABILITIES:
            found.append(f"capabilities added to {name}: {sorted(added - BASELINE_CAPABILITIES)}")
        # --- restricted ---
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"allowPrivilegeEscalation not false in {name}")
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"capabilities of {name} do not drop ALL")
        if added - {"NET_BIND_SERVICE"}:
            found.append(f"capabilities added to {name} beyond NET_BIND_SERVICE")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            found.append(f"runAsNonRoot not true for {name}")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"seccompProfile of {name} not RuntimeDefault or Localhost")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if kinds - RESTRICTED_VOLUMES:
            found.append(f"volume {v.get('name')} of type {sorted(kinds)}")
    return found
