"""LocalCluster: the rendered dev overlay's workloads as local processes (tests/test_k8s_topology.py
explains the rules). No cluster can run here, so this does what the kubelet would do with the
manifests, as literally as a process on one machine allows."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.helpers import free_port
from tests.k8s_helpers import ROOT, Rendered, container_env, containers, expand, pod_labels, pod_spec, selector_matches
from tests.servers import PostgresServer, S3Server

NAMESPACE = "d3"
# The images' own paths (not volumes) and where their content is in this checkout.
IMAGE_PATHS = {"/app": ROOT, "/usr/share/nginx/html": ROOT / "web" / "dist"}
# Images the project's test helpers stand in for.
HELPER_IMAGES = {"postgres": "postgres:", "minio": "minio/minio:"}
# What the d3 images' PATH finds: the project's venv, then the system (nginx, redis-server).
PATH = os.pathsep.join([str(ROOT / ".venv" / "bin"),
                        *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)[:1],
                        "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
_ADDRESS = re.compile(r"(?<![\w.\-\]:])(?P<host>\[::\]|[A-Za-z0-9][A-Za-z0-9.-]*)?:(?P<port>\d{2,5})(?![\w.])")
_PORT_FLAG = re.compile(r"^(--[\w-]*port)(=?)(\d+)$")
_SERVICE_SUFFIXES = (f".{NAMESPACE}.svc.cluster.local", f".{NAMESPACE}.svc", f".{NAMESPACE}")
_OWN_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost", "[::]", None}  # noqa: S104 - names in manifests


@dataclass
class ProbeResult:
    workload: str
    container: str
    kind: str
    what: str
    ok: bool
    detail: str = ""
    skipped: bool = False

    def __str__(self) -> str:
        state = "SKIP" if self.skipped else ("ok" if self.ok else "FAIL")
        return f"{state:4} {self.workload}/{self.container} {self.kind}: {self.what} {self.detail}".rstrip()


class _PortPostgres(PostgresServer):
    """The project's throwaway PostgreSQL, on the port the postgres Service declares."""

    def __init__(self, port: int) -> None:
        self._wanted = port
        super().__init__()

    def start(self) -> None:
        self.port = self._wanted
        super().start()


class _PortS3(S3Server):
    def __init__(self, port: int) -> None:
        self._wanted = port
        super().__init__()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = self._wanted
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        super().start()


class LocalCluster:
    def __init__(self, rendered: Rendered, workdir: Path) -> None:
        self.r = rendered
        self.workdir = workdir
        self.processes: dict[tuple[str, str], subprocess.Popen] = {}
        self.log_files: dict[tuple[str, str], Path] = {}
        self.running: set[str] = set()
        self.completed: set[str] = set()
        self.skipped: dict[str, str] = {}
        self.helpers: dict[str, Any] = {}
        self.workloads = {w["metadata"]["name"]: w for w in rendered.workloads()}
        self._service_ports: dict[tuple[str, int], int] = {}
        self._pod_ports: dict[tuple[str, int], int] = {}
        self._volumes: dict[tuple[str, str], Path] = {}
        self._map_ports()
        self._check_image_paths()
        # Volumes live outside pytest's private (0700) folders: like an emptyDir they are open to
        # the pod's user, as whom (root here) every process runs, so the work tree is read-only
        # to it just as the image's root filesystem is.
        self.volume_root = Path(tempfile.mkdtemp(prefix="d3-k8s-volumes-", dir=VOLUME_BASE if SANDBOX else None))
        self.volume_root.chmod(0o755)

    # -- tables ----------------------------------------------------------------------------------
    def _map_ports(self) -> None:
        for service in self.r.of_kind("Service"):
            selector = {"matchLabels": service["spec"]["selector"]}
            (workload,) = [w for w in self.workloads.values()
                           if w["kind"] != "Job" and selector_matches(selector, pod_labels(w))]
            name = workload["metadata"]["name"]
            by_name = {p.get("name"): p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                container_port = by_name[target] if isinstance(target, str) else target
                assert container_port in by_name.values(), f"Service {service['metadata']['name']}: no {target}"
                local = self._pod_ports.setdefault((name, container_port), free_port())
                self._service_ports[(service["metadata"]["name"], port["port"])] = local
        for name, workload in self.workloads.items():  # ports no Service names still get one
            for container in containers(workload):
                for port in container.get("ports", []):
                    self._pod_ports.setdefault((name, port["containerPort"]), free_port())

    def _check_image_paths(self) -> None:
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert "WORKDIR /app" in dockerfile and "COPY gunicorn_config.py ./" in dockerfile
        assert "COPY --from=web-build /src/web/dist /usr/share/nginx/html" in dockerfile

    def service_port(self, service: str, port: int) -> int:
        return self._service_ports[(service, port)]

    def _own_ports(self, workload: str) -> dict[int, int]:
        return {cp: local for (name, cp), local in self._pod_ports.items() if name == workload}

    def _volume_dir(self, workload: str, volume: dict[str, Any]) -> Path:
        key = (workload, volume["name"])
        if key not in self._volumes:
            folder = self.volume_root / workload / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folder.parent.chmod(0o755)
            folder.chmod(0o755 if "configMap" in volume or "secret" in volume else 0o777)
            self._volumes[key] = folder
        return self._volumes[key]

    def _fill(self, folder: Path, volume: dict[str, Any], workload: str, paths: dict[str, Path]) -> None:
        """A configMap/secret volume's files, with the same rewrite table as env and args."""
        if "configMap" in volume:
            data = self.r.configmap(volume["configMap"]["name"])
        elif "secret" in volume:
            data = self.r.secret(volume["secret"]["secretName"])
        else:
            return
        own = self._own_ports(workload)

        def listen(match: re.Match) -> str:  # nginx's `listen <port>`: the pod's own port
            port = int(match.group(2))
            return f"{match.group(1)}{own.get(port, port)}"

        for item_key, text in data.items():
            text = re.sub(r"(?m)^(\s*listen\s+)(\d+)(?=[\s;])", listen, text)
            (folder / item_key).write_text(self.rewrite(text, workload, paths))
            (folder / item_key).chmod(0o644)

    def _paths(self, workload: dict[str, Any], container: dict[str, Any]) -> dict[str, Path]:
        name = workload["metadata"]["name"]
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        paths: dict[str, Path] = dict(IMAGE_PATHS)
        for mount in container.get("volumeMounts", []):
            if mount["name"] in volumes:
                paths[mount["mountPath"]] = self._volume_dir(name, volumes[mount["name"]])
            else:
                assert mount["name"] in claims, f"{name}: volumeMount {mount['name']} names no volume"
                paths[mount["mountPath"]] = self._volume_dir(name, {"name": mount["name"]})
        for mount in container.get("volumeMounts", []):
            if mount["name"] in volumes:
                self._fill(paths[mount["mountPath"]], volumes[mount["name"]], name, paths)
        return paths

    def mounts(self, container: dict[str, Any], paths: dict[str, Path]) -> list[tuple[Path, str, bool]]:
        """(local folder, mountPath, read-only) of each volumeMount."""
        return [(paths[m["mountPath"]], m["mountPath"], bool(m.get("readOnly")))
                for m in container.get("volumeMounts", [])]

    def run_as(self, workload: dict[str, Any], container: dict[str, Any], program: str,
               env: dict[str, str]) -> tuple[int, int] | None:
        """The pod's user and group (runAsUser/runAsGroup) for a process, when we can switch to
        it: as root, and when that user can execute the program (the venv's interpreter may live
        where only root can go, e.g. pyenv under /root; those processes stay root)."""
        pod = pod_spec(workload).get("securityContext", {})
        own = container.get("securityContext", {})
        user = own.get("runAsUser", pod.get("runAsUser"))
        group = own.get("runAsGroup", pod.get("runAsGroup", user))
        assert user not in (None, 0), f"{workload['metadata']['name']}/{container['name']} would run as root"
        if os.geteuid() != 0:
            return None
        path = shutil.which(program, path=env.get("PATH", PATH))
        if path is None or not _reachable_by_others(Path(path)):
            return None
        if Path(path).name in ("sh", "bash", "dash") and not _reachable_by_others(ROOT / ".venv" / "bin" / "python"):
            return None  # a shell may start the venv's programs, which this user cannot run here
        with open(path, "rb") as handle:
            first = handle.readline()
        if first.startswith(b"#!"):
            interpreter = first[2:].split()[0].decode()
            if not _reachable_by_others(Path(interpreter)):
                return None
        return user, group

    def prepare(self, workload: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str],
                paths: dict[str, Path]) -> tuple[list[str], dict[str, Any]]:
        """The final argv and Popen arguments: sandboxed, as the pod's user where possible."""
        ids = self.run_as(workload, container, argv[0], env)
        if SANDBOX:
            return sandboxed(argv, self.mounts(container, paths), ids), {}
        if ids:
            return argv, {"user": ids[0], "group": ids[1], "extra_groups": []}
        return argv, {}

    def rewrite(self, text: str, workload: str, paths: dict[str, Path]) -> str:
        own = self._own_ports(workload)

        def address(match: re.Match) -> str:
            host, port = match.group("host"), int(match.group("port"))
            if host in _OWN_HOSTS and port in own:
                return f"{host or ''}:{own[port]}"
            service = host or ""
            for suffix in _SERVICE_SUFFIXES:
                if service.endswith(suffix):
                    service = service[: -len(suffix)]
            if (service, port) in self._service_ports:
                return f"127.0.0.1:{self._service_ports[(service, port)]}"
            return match.group(0)

        text = _ADDRESS.sub(address, text)
        for mount in sorted(paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(mount)}(?=/|[\s;\"',:]|$)", str(paths[mount]), text)
        return text

    def _argv(self, argv: list[str], workload: str, paths: dict[str, Path]) -> list[str]:
        own = self._own_ports(workload)
        out = []
        for i, arg in enumerate(argv):
            match = _PORT_FLAG.match(arg)
            if match and match.group(2) and int(match.group(3)) in own:
                arg = f"{match.group(1)}={own[int(match.group(3))]}"
            elif arg.isdigit() and i and re.fullmatch(r"--[\w-]*port", argv[i - 1]) and int(arg) in own:
                arg = str(own[int(arg)])
            out.append(self.rewrite(arg, workload, paths))
        return out

    def environment(self, workload: dict[str, Any], container: dict[str, Any]) -> tuple[dict[str, str], dict]:
        name = workload["metadata"]["name"]
        paths = self._paths(workload, container)
        env = {k: self.rewrite(v, name, paths) for k, v in container_env(self.r, container).items()}
        env.setdefault("PATH", PATH)
        env.setdefault("HOSTNAME", socket.gethostname())  # the kubelet sets it to the pod's name
        return env, paths

    def command(self, workload: dict[str, Any], container: dict[str, Any]) -> tuple[list[str], dict, Path, dict]:
        env_raw = container_env(self.r, container)
        argv = [expand(a, env_raw) for a in container.get("command", []) + container.get("args", [])]
        assert argv, f"{workload['metadata']['name']}/{container['name']}: no command in the manifest"
        env, paths = self.environment(workload, container)
        argv, kwargs = self.prepare(workload, container, self._argv(argv, workload["metadata"]["name"], paths),
                                    env, paths)
        workdir = container.get("workingDir")
        cwd = Path(self.rewrite(workdir, workload["metadata"]["name"], paths)) if workdir else self.volume_root
        return argv, env, cwd, kwargs

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, workload: dict[str, Any], container: dict[str, Any], suffix: str = "") -> subprocess.Popen:
        name = workload["metadata"]["name"]
        argv, env, cwd, kwargs = self.command(workload, container)
        log = self.workdir / "logs" / f"{name}-{container['name']}{suffix}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        log.chmod(0o666)  # like a container's stdout, reopening /dev/stdout works for the pod's user
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        handle.close()
        self.log_files[(name, container["name"] + suffix)] = log
        return process

    def _run_to_completion(self, workload: dict[str, Any], container: dict[str, Any], timeout: float) -> None:
        process = self._spawn(workload, container, "-run")
        try:
            rc = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)
            raise AssertionError(f"{workload['metadata']['name']}/{container['name']} did not finish in {timeout}s"
                                 f"\n{self._tail(workload['metadata']['name'], container['name'] + '-run')}") from None
        assert rc == 0, (f"{workload['metadata']['name']}/{container['name']} exited {rc}\n"
                         f"{self._tail(workload['metadata']['name'], container['name'] + '-run')}")

    def _missing_command(self, container: dict[str, Any]) -> str | None:
        """The d3 sub-command a container runs, when this checkout's `d3` does not have it."""
        argv = container.get("command", []) + container.get("args", [])
        if argv[:1] != ["d3"] or len(argv) < 2:
            return None
        commands = subprocess.run([str(ROOT / ".venv" / "bin" / "d3"), "--help"], capture_output=True, text=True,
                                  timeout=120).stdout
        if re.search(rf"^\s+{re.escape(argv[1])}\s", commands, re.M):
            return None
        return f"`d3 {argv[1]}` is not a command of this checkout yet (its tier has not landed)"

    def start(self) -> None:
        for name in ("postgres", "minio", "redis"):
            self._start_storage(self.workloads[name])
        for name, workload in self.workloads.items():
            if workload["kind"] == "Job":
                for container in containers(workload, init=True) + containers(workload):
                    self._run_to_completion(workload, container, 180)
                self.completed.add(name)
        deployments = [w for w in self.workloads.values() if w["kind"] == "Deployment"]
        for workload in deployments:
            name = workload["metadata"]["name"]
            reason = next(filter(None, (self._missing_command(c) for c in containers(workload, True)
                                        + containers(workload))), None)
            if name == "web" and not (ROOT / "web" / "dist" / "index.html").exists():
                reason = "web/dist/index.html is missing: the front end is not built in this checkout"
            if reason:
                self.skipped[name] = reason
                continue
            for container in containers(workload, init=True):
                self._run_to_completion(workload, container, 180)
            for container in containers(workload):
                self.processes[(name, container["name"])] = self._spawn(workload, container)
            self.running.add(name)
        for workload in deployments:
            if workload["metadata"]["name"] in self.running:
                self._wait_started(workload)

    def _start_storage(self, workload: dict[str, Any]) -> None:
        name = workload["metadata"]["name"]
        (container,) = containers(workload)
        own = self._own_ports(name)
        (container_port,) = [p["containerPort"] for p in container["ports"]]
        if container["image"].startswith(HELPER_IMAGES["postgres"]):
            env = container_env(self.r, container)
            server = _PortPostgres(own[container_port])
            self.helpers[name] = server
            self._configure_postgres(server, env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
        elif container["image"].startswith(HELPER_IMAGES["minio"]):
            env = container_env(self.r, container)
            self.helpers[name] = _PortS3(own[container_port])
            self.helpers[f"{name}-credentials"] = (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
        else:
            self.processes[(name, container["name"])] = self._spawn(workload, container)
        self.running.add(name)
        self._wait_started(workload)

    @staticmethod
    def _configure_postgres(server: PostgresServer, user: str, password: str, database: str) -> None:
        """What the postgres image's entrypoint does with POSTGRES_*; then passwords are required."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="d3", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cursor:
            if user == "d3":
                cursor.execute(sql.SQL("ALTER ROLE d3 PASSWORD %s"), (password,))
            else:
                cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(user)), (password,))
            cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                          sql.Identifier(user)))
        conn.close()
        (server.data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
                                                 "host all all ::1/128 scram-sha-256\n")
        server._run([_pg_ctl(), "-D", str(server.data), "reload"])
        time.sleep(0.5)

    def _wait_started(self, workload: dict[str, Any], timeout: float = 240) -> None:
        name = workload["metadata"]["name"]
        for container in containers(workload):
            probe = container.get("startupProbe") or container.get("readinessProbe")
            if name in self.helpers:
                deadline = time.monotonic() + 30
                port = next(iter(self._own_ports(name).values()))
                while not _port_open(port):
                    assert time.monotonic() < deadline, f"{name}: the stand-in is not listening on {port}"
                    time.sleep(0.2)
                if not container["image"].startswith(HELPER_IMAGES["postgres"]):
                    continue
            limit = min(timeout, probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) + 30)
            deadline = time.monotonic() + limit
            while True:
                process = self.processes.get((name, container["name"]))
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"{name}/{container['name']} exited {process.returncode} while starting\n"
                                         f"{self._tail(name, container['name'])}")
                result = self.probe(workload, container, "startupProbe" if "startupProbe" in container
                                    else "readinessProbe", probe)
                if result.ok:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name}/{container['name']}: startup probe never passed ({result})\n"
                                         f"{self._tail(name, container['name'])}")
                time.sleep(0.5)

    # -- probes ----------------------------------------------------------------------------------
    def probe(self, workload: dict[str, Any], container: dict[str, Any], kind: str, probe: dict) -> ProbeResult:
        name = workload["metadata"]["name"]
        own = self._own_ports(name)
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        if "httpGet" in probe:
            port = probe["httpGet"]["port"]
            port = ports[port] if isinstance(port, str) else port
            path = probe["httpGet"].get("path", "/")
            what = f"GET :{port}{path}"
            if name in self.helpers:
                return ProbeResult(name, container["name"], kind, what, False,
                                   "(the S3 stand-in is not MinIO: its health paths are MinIO's own)", skipped=True)
            try:
                response = requests.get(f"http://127.0.0.1:{own.get(port, port)}{path}",
                                        timeout=probe.get("timeoutSeconds", 1) + 4)
            except requests.RequestException as exc:
                return ProbeResult(name, container["name"], kind, what, False, type(exc).__name__)
            return ProbeResult(name, container["name"], kind, what, 200 <= response.status_code < 400,
                               f"-> {response.status_code}")
        if "tcpSocket" in probe:
            port = probe["tcpSocket"]["port"]
            port = ports[port] if isinstance(port, str) else port
            return ProbeResult(name, container["name"], kind, f"tcp :{port}", _port_open(own.get(port, port)))
        if "exec" in probe:
            env, paths = self.environment(workload, container)
            # exec commands are not $(VAR)-expanded
            argv, kwargs = self.prepare(workload, container, self._argv(probe["exec"]["command"], name, paths),
                                        env, paths)
            what = "exec " + shlex.join(probe["exec"]["command"])
            try:
                result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=self.volume_root,
                                        timeout=probe.get("timeoutSeconds", 1) + 30, **kwargs)
            except subprocess.TimeoutExpired:
                return ProbeResult(name, container["name"], kind, what, False, "timed out")
            return ProbeResult(name, container["name"], kind, what, result.returncode == 0,
                               f"-> {result.returncode} {result.stdout[-200:]}{result.stderr[-300:]}".strip())
        raise AssertionError(f"{name}/{container['name']} {kind}: no httpGet, tcpSocket or exec")

    def run_probes(self) -> list[ProbeResult]:
        results = []
        for name in sorted(self.running):
            workload = self.workloads[name]
            for container in containers(workload):
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if kind in container:
                        results.append(self.probe(workload, container, kind, container[kind]))
        return results

    # -- looking inside ----------------------------------------------------------------------------
    def exec_in(self, workload: str, container_name: str, argv: list[str], timeout: float = 120) -> str:
        """`kubectl exec` into a container: the same environment and mounts."""
        workload_obj = self.workloads[workload]
        container = next(c for c in containers(workload_obj) if c["name"] == container_name)
        env, paths = self.environment(workload_obj, container)
        cwd = Path(self.rewrite(container.get("workingDir", "/app"), workload, paths))
        argv, kwargs = self.prepare(workload_obj, container, argv, env, paths)
        result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
        assert result.returncode == 0, f"{shlex.join(argv)} in {workload}/{container_name}: {result.stderr}"
        return result.stdout

    def database_prediction_ids(self) -> set[str]:
        import psycopg2

        env = container_env(self.r, containers(self.workloads["postgres"])[0])
        conn = psycopg2.connect(host="127.0.0.1", port=self.helpers["postgres"].port, user=env["POSTGRES_USER"],
                                password=env["POSTGRES_PASSWORD"], dbname=env["POSTGRES_DB"])
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT id FROM predictions")
                return {str(row[0]) for row in cursor.fetchall()}
        finally:
            conn.close()

    def stored_objects(self, bucket: str) -> list[str]:
        from minio import Minio

        access, secret = self.helpers["minio-credentials"]
        client = Minio(f"127.0.0.1:{self.helpers['minio'].port}", access_key=access, secret_key=secret, secure=False)
        return [o.object_name for o in client.list_objects(bucket, recursive=True)]

    def _tail(self, workload: str, container: str, lines: int = 40) -> str:
        log = self.log_files.get((workload, container))
        if not log or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def log_mentions(self, workload: str, text: str) -> bool:
        return any(text in path.read_text(errors="replace") for (name, _), path in self.log_files.items()
                   if name == workload)

    def logs(self) -> str:
        return "\n".join(f"--- {w}/{c}\n{self._tail(w, c)}" for (w, c) in self.log_files)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)

    def stop(self) -> None:
        for process in self.processes.values():
            self._kill(process)
        for name, helper in self.helpers.items():
            if name == "postgres":
                helper.destroy()
            elif name == "minio":
                helper.stop()
        shutil.rmtree(self.volume_root, ignore_errors=True)


_SANDBOX = """
set -e
while [ "$1" != -- ]; do
    mount --rbind "${1%%=*}" "${1#*=}"  # recursive: with the checkout bound inside, if any
    shift
done
shift
while [ "$1" != -- ]; do
    mount --bind "$1" "$1"
    mount -o remount,bind,ro "$1"
    shift
done
shift
mount -o remount,bind,ro /
if [ "$1" = - ]; then
    shift
    exec "$@"
fi
ids="$1"
shift
exec setpriv --reuid="${ids%%:*}" --regid="${ids#*:}" --clear-groups -- "$@"
"""


def _sandbox_works() -> bool:
    """Whether this machine lets root give a process a private mount namespace (unshare -m)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")) or not os.path.isdir(VOLUME_BASE):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro / && ! touch /.d3-rw-probe 2>/dev/null"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# Volumes live on the tmpfs that every container has writable anyway (/dev/shm), apart from the
# root filesystem, which the sandbox makes read-only.
VOLUME_BASE = "/dev/shm"
SANDBOX = _sandbox_works()


def sandboxed(argv: list[str], mounts: list[tuple[Path, str, bool]], ids: tuple[int, int] | None = None) -> list[str]:
    """argv in a private mount namespace where the whole root filesystem is read-only, as
    readOnlyRootFilesystem makes it: only the container's volumes can be written. A volume whose
    mountPath exists here (/tmp) is also mounted there, as in the pod, because some paths are
    not settings (tempfile's /tmp); the others are reached through the rewritten settings. With
    `ids`, the process drops to that user and group once the mounts are in place."""
    if not SANDBOX:
        return argv
    # Not over the folder the volumes themselves live in (/dev/shm: writable here anyway).
    over = []
    for folder, path, _ in mounts:
        if not os.path.isdir(path) or path == "/" or str(folder).startswith(path.rstrip("/") + "/"):
            continue
        if str(ROOT).startswith(path.rstrip("/") + "/"):  # a checkout under /tmp: keep it visible there
            inside = Path(folder) / ROOT.relative_to(path)
            inside.mkdir(parents=True, exist_ok=True)
            over.append(f"{ROOT}={inside}")
        over.append(f"{folder}={path}")
    readonly = [str(folder) for folder, _, read_only in mounts if read_only]
    # The checkout bound into a volume is as read-only as the rest of the root filesystem, at both
    # of its paths (settings rewritten to the volume's folder reach it there).
    readonly += [part for entry in over if entry.startswith(f"{ROOT}=") for part in entry.split("=", 1)]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SANDBOX, "sandbox",
            *over, "--", *readonly, "--", f"{ids[0]}:{ids[1]}" if ids else "-", *argv]


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than root can execute `path` (every folder above it searchable)."""
    target = path.resolve()
    folders = [p for p in target.parents]
    return bool(target.stat().st_mode & 0o001) and all(p.stat().st_mode & 0o001 for p in folders)


def _pg_ctl() -> str:
    return sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)[0]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
