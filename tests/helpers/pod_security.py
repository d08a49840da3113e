"""Pod Security Standards, "restricted" profile (Kubernetes v1.31), checked on a pod spec.

The checks of k8s.io/pod-security-admission's policy package (baseline and restricted, as its
check_*.go files define them), written out because its checker is Go and no Python build of it
installs here. ``violations`` returns one line per failed check, naming the container.
"""

from __future__ import annotations

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def containers(pod: dict) -> list[tuple[str, dict]]:
    kinds = {"initContainers": "init container", "containers": "container", "ephemeralContainers": "ephemeral container"}
    return [(f"{label} {c.get('name', '?')}", c) for kind, label in kinds.items() for c in pod.get(kind, []) or []]


def violations(pod: dict) -> list[str]:
    out: list[str] = []
    pod_sc = pod.get("securityContext", {}) or {}
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"pod: {field}")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: hostProcess")
    for sysctl in pod_sc.get("sysctls", []) or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"pod: sysctl {sysctl['name']}")
    for volume in pod.get("volumes", []) or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            out.append(f"volume {volume['name']}: hostPath")
        if kinds - RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod: seccompProfile Unconfined")
    if pod_sc.get("runAsNonRoot") is False:
        out.append("pod: runAsNonRoot false")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    for name, c in containers(pod):
        sc = c.get("securityContext", {}) or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", []) or []):
            out.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        caps = sc.get("capabilities", {}) or {}
        added = set(caps.get("add", []) or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"{name}: capabilities added {sorted(added - BASELINE_CAPABILITIES)}")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in (caps.get("drop", []) or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if added - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities add more than NET_BIND_SERVICE")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true (container or pod)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp or 'unset'} (container or pod), not RuntimeDefault")
    return out
