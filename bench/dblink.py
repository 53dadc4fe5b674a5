"""Cost of the encrypted link from PgBouncer (on a web server) to PostgreSQL: native TLS vs stunnel.

What it measures. One PostgreSQL 15 cluster, PgBouncer 1.18 and stunnel are started on 127.0.0.1 in
a throw-away directory under /var/tmp, and pgbench runs the built-in select-only script (`-S`,
scale 1: one indexed primary-key SELECT per transaction, about the cheapest query there is, so the
link's cost is as visible as it can get) through each of these links, one after another:

  direct            pgbench -> PostgreSQL, plain TCP                           (the baseline, 1.00x)
  direct TLS        pgbench -> PostgreSQL, sslmode=require
  pgbouncer plain   pgbench -> PgBouncer -> PostgreSQL, plain TCP              (reference: no TLS)
  pgbouncer TLS     pgbench -> PgBouncer -> PostgreSQL, server_tls_sslmode=verify-full +
                    server_tls_ca_file                                        (what fabula does)
  stunnel pgsql     pgbench -> PgBouncer -> stunnel client (protocol = pgsql) -> PostgreSQL's own
                    TLS. This is what FabulAWS's stunnel.conf template actually did: stunnel
                    does the SSLRequest negotiation itself, so no second stunnel is needed.
  stunnel pair      pgbench -> PgBouncer -> stunnel client -> stunnel server -> PostgreSQL, plain
                    TCP: the classic two-ended tunnel (client on the web server, server in front
                    of PostgreSQL).

PgBouncer always listens on 127.0.0.1 without TLS (the app and PgBouncer share the web server), with
pool_mode = session and SCRAM client auth. Every link that crosses TLS verifies the server's
certificate (a CA and a server certificate for IP 127.0.0.1 are generated at start). Each link is
measured twice, for a fixed duration each:

  persistent   `pgbench -S`: every client keeps its connection; the cost is the per-query one
               (encrypt/decrypt each message, plus the extra hops through the proxies).
  new conn     `pgbench -S -C`: a new connection per transaction, like an app without persistent
               connections. Direct links pay a backend fork, SCRAM and (with TLS) a TLS handshake
               per transaction; behind PgBouncer the client side is a plain local connection and
               the server connections (and their TLS sessions) stay open in the pool, so the TLS
               handshake is paid only when the pool grows.

How to read the output. `tps` is pgbench's transactions per second, `vs direct` is tps divided by
the direct link's tps in the same mode (above 1.00 = faster than the baseline). `lat ms` is
pgbench's average latency; `conn ms` its average connection time (new-connection runs only). The
CPU columns are the CPU time each component used during the run divided by the number of
transactions (microseconds per transaction), from /proc: pgbench, PgBouncer, stunnel (both ends
summed) and PostgreSQL (postmaster and backends). Everything shares one machine, and with 8 clients
the CPUs are saturated, so tps is mostly "total CPU per transaction" in disguise: the CPU columns
tell *where* a link's cost goes, and they are less sensitive to noise than tps. `other CPU` is the
machine's CPU use (in cores) that was *not* one of these processes during the run: if it is well
above zero, something else was running and that row's tps is depressed; re-run. Loopback has no
network latency, so this measures the CPU cost of each link, not the round-trip cost of an extra
hop across a real network (the stunnel pair adds a hop; stunnel pgsql as many as native TLS).

New-connection runs: SCRAM costs milliseconds of CPU per connection (4096 PBKDF2 iterations, once in
pgbench and once in whoever checks the password: PostgreSQL for direct links, PgBouncer otherwise),
which dwarfs both the TLS handshake and the per-query link cost; the CPU columns show that. PgBouncer
is one single-threaded process: 1,000,000 / its `CPU pgbouncer` is the most transactions (here: new
connections) per second it can serve, whatever the link behind it.

Run as root (PostgreSQL, PgBouncer and stunnel run as the `postgres` user):
`.venv/bin/python bench/dblink.py [--duration 8] [--clients 8] [--jobs 2] [--rounds 1]`. It takes about two
minutes and removes every process and file it created, also on an error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import pwd
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import __version__ as CRYPTOGRAPHY_VERSION
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console

from fabula.sample import free_ports
from harness import (
    NOISY,
    PGBENCH,
    PGBIN,
    PSQL,
    BenchError,
    as_postgres,
    children_of,
    clean_env,
    console,
    cpu_seconds,
    field_of,
    ignore_interrupts,
    interrupt_on_signals,
    load_average,
    machine_busy_seconds,
    proc_stat,
    require_root,
    table,
    tail,
    temp_base,
    wait_for,
)

PGBOUNCER = "/usr/sbin/pgbouncer"
STUNNEL = "/usr/bin/stunnel4"
HOST = "127.0.0.1"
DB = USER = "bench"


# --------------------------------------------------------------------------- processes


def _same_process(pid: int, start: str) -> bool:
    st = proc_stat(pid)
    return st is not None and st[19] == start and st[0] != "Z"


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    stop_signal: int
    log: Path


@dataclass
class Children:
    """The long-running processes this script started, stopped in reverse order in `stop_all`."""
    items: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, stop_signal: int, cwd: Path) -> Child:
        with open(log, "ab") as out:
            popen = subprocess.Popen(as_postgres() + argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, cwd=cwd, env=clean_env(),
                                     start_new_session=True)  # Ctrl-C reaches us, not them
        child = Child(name, popen, stop_signal, log)
        self.items.append(child)
        return child

    def get(self, name: str) -> Child:
        return next(c for c in self.items if c.name == name)

    def check_alive(self) -> None:
        for c in self.items:
            if c.popen.poll() is not None:
                raise BenchError(f"{c.name} exited with status {c.popen.returncode}:\n{tail(c.log)}")

    def stop_all(self, timeout: float = 20) -> list[str]:
        """Stop every process (and anything it forked); return what had to be SIGKILLed."""
        forked = {c.name: children_of(c.popen.pid) for c in self.items if c.popen.poll() is None}
        for c in reversed(self.items):
            if c.popen.poll() is None:
                try:
                    os.kill(c.popen.pid, c.stop_signal)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        killed = []
        for c in reversed(self.items):
            try:
                c.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(c.name)
                c.popen.kill()
                c.popen.wait()
            for pid, start in forked.get(c.name, []):  # e.g. PostgreSQL backends if it was killed
                if _same_process(pid, start):
                    killed.append(f"{c.name} child {pid}")
                    os.kill(pid, signal.SIGKILL)
        return killed


def run(argv: list[str], *, what: str, as_postgres_user: bool = False, timeout: float = 120,
        env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run a short command to completion; its output, or BenchError with the output."""
    proc = subprocess.run((as_postgres() if as_postgres_user else []) + argv, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env or clean_env(), cwd=cwd)
    if proc.returncode:
        raise BenchError(f"{what} failed (status {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def wait_until(check, *, what: str, timeout: float, children: Children):
    """Poll `check` (returns a truthy value or raises) until it succeeds, giving up at once if
    one of our servers exited; BenchError after `timeout`."""
    return wait_for(check, timeout, interval=0.1, message=what, check=children.check_alive)


# --------------------------------------------------------------------------- certificates


def make_certs(conf: Path, owner: pwd.struct_passwd) -> None:
    """A CA and a server certificate for IP 127.0.0.1 (EC P-256, like fabula's own PKI)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dblink bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (conf / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (conf / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = conf / "server.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chown(key_path, owner.pw_uid, owner.pw_gid)  # PostgreSQL wants its key 0600 and its own


# --------------------------------------------------------------------------- the links


@dataclass
class Link:
    key: str
    label: str
    path: str
    port: int
    sslmode: str  # what pgbench asks for
    expect_pg_ssl: bool  # whether PostgreSQL should see the connection it serves as TLS
    pgbouncer: str | None = None  # Children names, for the CPU columns
    stunnels: tuple[str, ...] = ()
    tls: str = ""  # filled by the probe


def pgbouncer_ini(conf: Path, listen: int, server_port: int, tls: bool) -> str:
    tls_lines = (f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {conf}/ca.crt\n"
                 "server_tls_protocols = secure\n") if tls else "server_tls_sslmode = disable\n"
    return f"""\
[databases]
{DB} = host={HOST} port={server_port} dbname={DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {listen}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {conf}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
{tls_lines}ignore_startup_parameters = extra_float_digits,options
; one log line per client connection would make the new-connection runs measure logging
log_connections = 0
log_disconnections = 0
"""


STUNNEL_GLOBAL = """\
foreground = yes
pid =
debug = info
; as FabulAWS's template (stunnel 5.68 enables it by default anyway)
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


def stunnel_client_conf(conf: Path, accept: int, connect: int, pgsql: bool) -> str:
    return STUNNEL_GLOBAL + f"""
[pg]
client = yes
accept = {HOST}:{accept}
connect = {HOST}:{connect}
{"protocol = pgsql" if pgsql else ""}
CAfile = {conf}/ca.crt
verifyChain = yes
checkIP = {HOST}
sslVersionMin = TLSv1.2
"""


def stunnel_server_conf(conf: Path, accept: int, connect: int) -> str:
    return STUNNEL_GLOBAL + f"""
[pg]
accept = {HOST}:{accept}
connect = {HOST}:{connect}
cert = {conf}/server.crt
key = {conf}/server.key
sslVersionMin = TLSv1.2
"""


def libpq_env(link: Link, password: str, conf: Path) -> dict[str, str]:
    return clean_env(PGHOST=HOST, PGPORT=str(link.port), PGUSER=USER, PGDATABASE=DB, PGPASSWORD=password,
                     PGSSLMODE=link.sslmode, PGSSLROOTCERT=str(conf / "ca.crt"), PGGSSENCMODE="disable",
                     PGCONNECT_TIMEOUT="5")


# --------------------------------------------------------------------------- pgbench


@dataclass
class Result:
    link: Link
    new_conn: bool
    tps: float
    transactions: int
    failed: int
    latency_ms: float
    conn_ms: float | None
    cpu_us: dict[str, float]  # per transaction
    other_cores: float
    spread: float | None = None  # half the min-max range of tps over rounds, relative


def bench(link: Link, new_conn: bool, args, password: str, conf: Path, children: Children,
          postmaster: int) -> Result:
    argv = [PGBENCH, "-n", "-S", "-T", str(args.duration), "-c", str(args.clients), "-j", str(args.jobs)]
    if new_conn:
        argv.append("-C")
    proxies = {"pgbouncer": [children.get(link.pgbouncer).popen.pid] if link.pgbouncer else [],
               "stunnel": [children.get(s).popen.pid for s in link.stunnels]}

    def sample() -> dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: finished pgbench runs
        return {"pgbench": ru.ru_utime + ru.ru_stime,
                **{k: sum(cpu_seconds(p) for p in pids) for k, pids in proxies.items()},
                "postgres": cpu_seconds(postmaster, with_children=True),
                "machine": machine_busy_seconds(), "wall": time.monotonic()}

    def settled() -> bool:
        """The run's backends have exited and been reaped (a direct link's), or are idle in the pool."""
        new = [pid for pid, _ in children_of(postmaster) if pid not in existing]
        if link.pgbouncer is None:
            return not new
        return all((proc_stat(pid) or ["X"])[0] not in "ZX" for pid in new)

    existing = {pid for pid, _ in children_of(postmaster)}
    before = sample()
    out = run(argv, what=f"pgbench on {link.label}", env=libpq_env(link, password, conf),
              timeout=args.duration + 120)
    # a backend's CPU time is only readable while it lives, then in the postmaster's cutime once
    # reaped: sampling in between would lose it
    wait_until(settled, what=f"the backends of pgbench on {link.label}", timeout=15, children=children)
    after = sample()
    n = field_of(r"number of transactions actually processed: (\d+)", out, int)
    if n == 0:
        raise BenchError(f"pgbench on {link.label} processed no transaction:\n{out}")
    used = {k: after[k] - before[k] for k in ("pgbench", "pgbouncer", "stunnel", "postgres")}
    other = (after["machine"] - before["machine"] - sum(used.values())) / (after["wall"] - before["wall"])
    return Result(link, new_conn, tps=field_of(r"tps = ([\d.]+)", out), transactions=n,
                  failed=field_of(r"number of failed transactions: (\d+)", out, int, default=0),
                  latency_ms=field_of(r"latency average = ([\d.]+) ms", out),
                  conn_ms=field_of(r"average connection time = ([\d.]+) ms", out) if new_conn else None,
                  cpu_us={k: v / n * 1e6 for k, v in used.items()}, other_cores=max(0.0, other))


def merge(rounds: list[Result]) -> Result:
    """The mean of several rounds of one link and mode (CPU weighted by transactions)."""
    n = sum(r.transactions for r in rounds)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    tps = [r.tps for r in rounds]
    return Result(rounds[0].link, rounds[0].new_conn, tps=mean(tps), transactions=n,
                  failed=sum(r.failed for r in rounds), latency_ms=mean([r.latency_ms for r in rounds]),
                  conn_ms=None if rounds[0].conn_ms is None else mean([r.conn_ms for r in rounds]),
                  cpu_us={k: sum(r.cpu_us[k] * r.transactions for r in rounds) / n for k in rounds[0].cpu_us},
                  other_cores=mean([r.other_cores for r in rounds]),
                  spread=(max(tps) - min(tps)) / 2 / mean(tps) if len(rounds) > 1 else None)


# --------------------------------------------------------------------------- output


def versions() -> list[tuple[str, str]]:
    def first(argv: list[str], keep=lambda line: True, lines: int = 1) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError as err:
            return f"({err})"
        kept = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and keep(ln)]
        return "; ".join(kept[:lines])
    return [
        ("PostgreSQL", first([str(PGBIN / "postgres"), "--version"])),
        ("pgbench", first([PGBENCH, "--version"])),
        ("PgBouncer", first([PGBOUNCER, "--version"], lambda ln: ln.startswith(("PgBouncer", "tls")), 2)),
        ("stunnel", first([STUNNEL, "-version"], lambda ln: ln.startswith(("stunnel", "Running")), 2)),
        ("OpenSSL (system)", first(["openssl", "version"])),
        ("cryptography (certs)", CRYPTOGRAPHY_VERSION),
        ("kernel / CPUs", f"Linux {platform.release()} / {os.cpu_count()} CPUs"),
    ]


def report(out: Console, results: list[Result], args, links: list[Link], load: tuple[str, str]) -> None:
    columns = ("link", "path", "encryption on the PgBouncer/client -> PostgreSQL link")
    info = table("Links (TLS as seen by the PostgreSQL backend serving the connection, or by stunnel)",
                 columns, left=columns, title_justify="left")
    for link in links:
        info.add_row(link.label, link.path, link.tls)
    out.print(info)
    for new_conn, title in ((False, "persistent connections: pgbench -S"),
                            (True, "new connection per transaction: pgbench -S -C")):
        rows = [r for r in results if r.new_conn == new_conn]
        base = next(r for r in rows if r.link.key == "direct").tps
        rounds = f", mean of {args.rounds} rounds" if args.rounds > 1 else ""
        figures = table(f"{title} -T {args.duration} -c {args.clients} -j {args.jobs}{rounds}  "
                        "(CPU in µs per transaction)",
                        ("link", "tps", "vs direct", "lat ms", "conn ms", "CPU pgbench", "CPU pgbouncer",
                         "CPU stunnel", "CPU postgres", "CPU total", "other CPU"), left=("link",),
                        title_justify="left")
        for r in rows:
            c = r.cpu_us
            figures.add_row(r.link.label + (f" ({r.failed} failed)" if r.failed else ""),
                          f"{r.tps:,.0f}" + ("" if r.spread is None else f" ±{r.spread:.0%}"),
                          f"{r.tps / base:.2f}x", f"{r.latency_ms:.3f}",
                          "-" if r.conn_ms is None else f"{r.conn_ms:.3f}",
                          f"{c['pgbench']:.0f}", f"{c['pgbouncer']:.0f}" if r.link.pgbouncer else "-",
                          f"{c['stunnel']:.0f}" if r.link.stunnels else "-", f"{c['postgres']:.0f}",
                          f"{sum(c.values()):.0f}", f"{r.other_cores:.2f}" + (" !" if r.other_cores > NOISY else ""))
        out.print(figures)
    if any(r.other_cores > NOISY for r in results):
        out.print(f"! = other processes used more than {NOISY} cores during that run: its tps is depressed. "
                      "The CPU µs/tx columns are the more robust figures; re-run on a quiet machine, "
                      "or with --rounds 2.")
    ver = table("Versions", ("what", "version"), left=("what", "version"), title_justify="left", show_header=False)
    for name, value in versions():
        ver.add_row(name, value)
    ver.add_row("load average", f"before {load[0]}, after {load[1]}")
    out.print(ver)
    out.print("Reading: tps of each TLS-through-PgBouncer variant relative to fabula's native TLS "
                  "(above 1.00 = that variant is faster):")
    for new_conn, mode in ((False, "persistent"), (True, "new conn  ")):
        by = {r.link.key: r for r in results if r.new_conn == new_conn}
        native = by["pgb_tls"]
        parts = [f"{by[k].link.label} {by[k].tps / native.tps:.2f}x "
                 f"(link CPU {sum(by[k].cpu_us[p] for p in ('pgbouncer', 'stunnel')):.0f} vs "
                 f"{native.cpu_us['pgbouncer']:.0f} µs/tx)" for k in ("stunnel_pgsql", "stunnel_pair")]
        out.print(f"  {mode}: " + "; ".join(parts) +
                      f"; pgbouncer TLS / pgbouncer plain {native.tps / by['pgb_plain'].tps:.2f}x")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per pgbench run (default 8)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the series, every other round in reverse order; report means (default 1)")
    args = parser.parse_args()
    require_root("dblink.py", "it runs the servers as the postgres user")
    postgres_user = pwd.getpwnam("postgres")
    out = console(170)
    interrupt_on_signals()
    root = temp_base("dblink-bench-")
    children = Children()
    status = 0
    started = time.monotonic()
    try:
        conf, logs, pgdir, sock = root / "conf", root / "logs", root / "pg", root / "run"
        for d in (conf, logs, pgdir, sock):
            d.mkdir(mode=0o755)
        for d in (pgdir, sock):
            os.chown(d, postgres_user.pw_uid, postgres_user.pw_gid)
        pgdir.chmod(0o700)
        make_certs(conf, postgres_user)
        password = secrets.token_hex(16)
        userlist = conf / "userlist.txt"
        userlist.touch(mode=0o600)
        userlist.write_text(f'"{USER}" "{password}"\n')
        os.chown(userlist, postgres_user.pw_uid, postgres_user.pw_gid)

        (pg_port, pgb_plain, pgb_tls, pgb_sp, pgb_pair, st_pgsql, st_client, st_server) = free_ports(8)

        # PostgreSQL
        data = pgdir / "data"
        out.print(f"[dim]setting up in {root} ...[/dim]")
        run([str(PGBIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8",
             "--auth-local=peer", "--auth-host=scram-sha-256", "-N"], what="initdb", as_postgres_user=True, cwd=root)
        with open(data / "postgresql.conf", "a") as f:
            f.write(f"""
# dblink benchmark
listen_addresses = '{HOST}'
port = {pg_port}
unix_socket_directories = '{sock}'
max_connections = 100
password_encryption = scram-sha-256
ssl = on
ssl_cert_file = '{conf}/server.crt'
ssl_key_file = '{conf}/server.key'
ssl_min_protocol_version = 'TLSv1.2'
fsync = off              # throw-away cluster; the runs are read-only anyway
logging_collector = off
""")
        (data / "pg_hba.conf").write_text(
            "local all postgres peer\n"
            f"host {DB} {USER} {HOST}/32 scram-sha-256\n"  # plain and TLS: the runs choose
            "host all all 0.0.0.0/0 reject\n")
        pg = children.start("postgres", [str(PGBIN / "postgres"), "-D", str(data)], logs / "postgres.log",
                            signal.SIGINT, root)  # SIGINT = fast shutdown
        wait_until(lambda: subprocess.run([str(PGBIN / "pg_isready"), "-q", "-h", HOST, "-p", str(pg_port)],
                                          timeout=10).returncode == 0,
                   what="PostgreSQL", timeout=60, children=children)
        run([PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(sock), "-p", str(pg_port), "-d", "postgres",
             "-f", "-"], what="creating the role and database", as_postgres_user=True, cwd=root,
            stdin=f"CREATE ROLE {USER} LOGIN PASSWORD '{password}';\nCREATE DATABASE {DB} OWNER {USER};\n")

        links = [
            Link("direct", "direct", "pgbench -> PostgreSQL", pg_port, "disable", False),
            Link("direct_tls", "direct TLS", "pgbench -(TLS, sslmode=require)-> PostgreSQL", pg_port, "require", True),
            Link("pgb_plain", "pgbouncer plain", "pgbench -> PgBouncer -> PostgreSQL (no TLS, reference)",
                 pgb_plain, "disable", False, "pgb_plain"),
            Link("pgb_tls", "pgbouncer TLS", "pgbench -> PgBouncer -(TLS verify-full)-> PostgreSQL (fabula)",
                 pgb_tls, "disable", True, "pgb_tls"),
            Link("stunnel_pgsql", "stunnel pgsql", "pgbench -> PgBouncer -> stunnel client -(TLS, protocol=pgsql)"
                 "-> PostgreSQL (FabulAWS's template)", pgb_sp, "disable", True, "pgb_sp", ("stunnel_pgsql",)),
            Link("stunnel_pair", "stunnel pair", "pgbench -> PgBouncer -> stunnel client -(TLS)-> stunnel server "
                 "-> PostgreSQL", pgb_pair, "disable", False, "pgb_pair", ("stunnel_client", "stunnel_server")),
        ]
        init_env = libpq_env(links[0], password, conf)
        run([PGBENCH, "-i", "-s", "1", "-q"], what="pgbench -i", env=init_env, timeout=300)

        # stunnel and PgBouncer
        for name, text in (("stunnel_pgsql", stunnel_client_conf(conf, st_pgsql, pg_port, pgsql=True)),
                           ("stunnel_server", stunnel_server_conf(conf, st_server, pg_port)),
                           ("stunnel_client", stunnel_client_conf(conf, st_client, st_server, pgsql=False))):
            (conf / f"{name}.conf").write_text(text)
            children.start(name, [STUNNEL, str(conf / f"{name}.conf")], logs / f"{name}.log", signal.SIGTERM, root)
        for name, listen, target, tls in (("pgb_plain", pgb_plain, pg_port, False),
                                          ("pgb_tls", pgb_tls, pg_port, True),
                                          ("pgb_sp", pgb_sp, st_pgsql, False),
                                          ("pgb_pair", pgb_pair, st_client, False)):
            (conf / f"{name}.ini").write_text(pgbouncer_ini(conf, listen, target, tls))
            # SIGTERM = immediate shutdown (SIGINT would wait for clients)
            children.start(name, [PGBOUNCER, str(conf / f"{name}.ini")], logs / f"{name}.log", signal.SIGTERM, root)

        # every link answers, and is (not) encrypted where PostgreSQL sees it as expected
        query = "select ssl, coalesce(version, ''), coalesce(cipher, '') from pg_stat_ssl where pid = pg_backend_pid()"
        for link in links:
            probe = wait_until(lambda link=link: run([PSQL, "-X", "-A", "-t", "-c", query],
                                                     what=f"psql via {link.label}",
                                                     env=libpq_env(link, password, conf), timeout=15).strip(),
                               what=link.label, timeout=30, children=children)
            ssl, version, cipher = probe.split("|")
            if (ssl == "t") != link.expect_pg_ssl:
                raise BenchError(f"{link.label}: PostgreSQL reports ssl={ssl}, expected {link.expect_pg_ssl}")
            link.tls = f"{version} {cipher} (PostgreSQL)" if ssl == "t" else "none at PostgreSQL"
            if link.key == "stunnel_pair":
                suites = re.findall(r"(TLSv[\d.]+ ciphersuite: \S+)", (logs / "stunnel_client.log").read_text())
                if not suites:
                    raise BenchError("stunnel pair: no TLS session in the client's log:\n"
                                     + tail(logs / "stunnel_client.log"))
                link.tls = f"{suites[-1].replace(' ciphersuite:', '')} (stunnel client<->server); plain at PostgreSQL"
        out.print(f"[dim]setup done in {time.monotonic() - started:.0f} s; "
                      f"{2 * len(links) * args.rounds} runs of {args.duration} s follow[/dim]")

        load_before = load_average()
        runs = []
        for rnd in range(args.rounds):
            for new_conn in (False, True):
                for link in (links if rnd % 2 == 0 else links[::-1]):
                    r = bench(link, new_conn, args, password, conf, children, pg.popen.pid)
                    runs.append(r)
                    out.print(f"[dim]  {link.label:16} {'-C' if new_conn else '  '} {r.tps:10,.0f} tps[/dim]")
        results = [merge([r for r in runs if r.link is link and r.new_conn == new_conn])
                   for new_conn in (False, True) for link in links]
        load_after = load_average()
        report(out, results, args, links, (load_before, load_after))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        status = 130
    except (BenchError, subprocess.TimeoutExpired, OSError) as err:
        print(f"\nbench/dblink.py failed: {err}", file=sys.stderr)
        status = 1
    finally:
        ignore_interrupts()  # a second Ctrl-C must not interrupt the cleanup
        killed = children.stop_all()
        if killed:
            print(f"had to SIGKILL: {', '.join(killed)}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        print(f"cleaned up ({len(children.items)} processes stopped, {root} removed); "
              f"total {time.monotonic() - started:.0f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
