"""Every bad fabula.yml is one clear error (exit 2, the file named, a `fix:` line, a bounded
message), never a traceback, a hang or a crash later.

A corpus of bad files goes through the real CLI (`fabula describe ENV -c FILE`); then
property-based tests mutate a valid config (random bytes, random YAML values at random keys):
it loads, or it is refused with a ConfigError of bounded length, and nothing else happens.
"""
from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabula.cli import main
from fabula.cli.runtime import CliEnvironment
from fabula.config import load_config
from fabula.errors import ConfigError
from tests.helpers import fabula_argv

MAX_MESSAGE = 3000  # characters of stderr a refused file may produce

VALID = """\
project: polls
app:
  wsgi: polls.wsgi:application
  settings: polls.settings
  celery: polls.celery:app
  requirements: requirements.txt
  manage: manage.py
environments:
  testing:
    servers: {web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}
    lb: {bind: 127.0.0.1, https_port: 8443, http_port: 8080}
    domains: [www.example.com, .example.org, 192.0.2.7]
"""


def with_env(extra: str) -> str:
    """VALID with `extra` (YAML, indented as under `testing:`) added to the environment."""
    return VALID + textwrap.indent(textwrap.dedent(extra), "    ")


def replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "requirements.txt").write_text("django\n")
    (folder / "manage.py").write_text("# manage\n")
    (folder / "fabula.yml").write_text(VALID)
    return folder / "fabula.yml"


def tls_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def billion_laughs(levels: int) -> str:
    """Anchors that each refer 9 times to the one before, the last one used as the project's name:
    a few hundred bytes that stand for 9**levels strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n" + replace("project: polls", f"project: *{chr(ord('a') + levels - 1)}")


def mismatched_pair(folder: Path) -> str:
    cert, _ = tls_pair(folder, "one")
    _, key = tls_pair(folder, "two")
    return with_env(f"lb: {{bind: 127.0.0.1, https_port: 8443, http_port: 8080, certificate: {cert.name}, "
                    f"key: {key.name}}}\n").replace("    lb: {bind: 127.0.0.1, https_port: 8443, http_port: 8080}\n",
                                                    "", 1)


def symlinked_manage(folder: Path) -> str:
    (folder / "evil.py").symlink_to("/etc/passwd")
    return replace("manage: manage.py", "manage: evil.py")


def symlinked_source(folder: Path) -> str:
    (folder / "root").symlink_to("/")
    return replace("app:\n", "app:\n  source: root\n  maintenance_page: root/etc/shadow\n")


def symlinked_page(folder: Path) -> str:
    (folder / "page.html").symlink_to("/etc/shadow")
    return replace("  manage: manage.py\n", "  manage: manage.py\n  maintenance_page: page.html\n")


def group_writable_backups(folder: Path) -> str:
    target = folder / "backups"
    target.mkdir()
    target.chmod(0o770)
    return with_env(f"db: {{backups: {target}}}\n")


def symlink_to_etc(folder: Path) -> str:
    (folder / "to-etc").symlink_to("/etc")
    return with_env(f"db: {{backups: {folder / 'to-etc'}}}\n")


def writable_python(folder: Path) -> str:
    target = folder / "python3"
    target.write_bytes(b"")
    target.chmod(0o777)
    return replace("  manage: manage.py\n", f"  manage: manage.py\n  python: {target}\n")


@dataclass
class Case:
    name: str
    content: bytes | str | Callable[[Path], bytes | str]
    expect: str = ""  # a piece of the message


CASES = [
    # -- bytes that are no YAML text
    Case("latin-1", (VALID + "# caf\u00e9 cr\u00e8me\n").encode("latin-1"), "not UTF-8"),
    Case("utf-16 with BOM", VALID.encode("utf-16"), "UTF-16"),
    Case("utf-16-le without BOM", VALID.encode("utf-16-le"), "NUL"),
    Case("NUL byte", VALID.replace("polls.settings", "polls.set\x00tings").encode(), "NUL"),
    Case("binary junk", bytes(range(256)) * 4, ""),
    Case("empty file", b"", "expected a mapping"),
    Case("a list", b"- project\n- app\n", "expected a mapping"),
    Case("a scalar", b"polls\n", "expected a mapping"),
    Case("too large", b"# " + b"x" * (1 << 20) + b"\n" + VALID.encode(), "too large"),
    # -- YAML that costs more than it says
    Case("deep flow nesting", "project: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested"),
    Case("deep block nesting", "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n", "nested"),
    Case("huge integer", replace("web: 2", "web: " + "9" * 5000), "number"),
    Case("huge sexagesimal", replace("web: 2", "web: " + ":".join(["1"] * 50_000)), "number"),
    Case("huge float", replace("web: 2", "web: 1" + "0" * 5000 + ".5"), "number"),
    Case("billion laughs (400 bytes)", billion_laughs(5), "alias"),
    Case("billion laughs (600 bytes)", billion_laughs(8), "alias"),
    Case("one anchor", replace("app:\n", "app: &app\n"), "anchor"),
    Case("merge key", replace("app:\n", "app:\n  <<: {python: /usr/bin/python3}\n"), "merge"),
    Case("unhashable key", VALID + "[a, b]: 1\n", "key"),
    Case("python tag", VALID + "x: !!python/object/apply:os.system [id]\n", "invalid YAML"),
    Case("syntax error", "project: polls\napp: [unclosed\n", "line 3"),
    # -- scalars PyYAML resolves, then cannot construct (plain Python errors inside the loader)
    Case("impossible date", replace("web: 2", "web: 2001-02-30"), "'2001-02-30' is not a date"),
    Case("year 0", replace("project: polls", "project: 0000-01-01"), "line 1, column 10"),
    Case("impossible time", replace("web: 2", "web: 2001-01-01 25:00:00"), "not a date or time"),
    Case("impossible date as a key", VALID + "2001-02-30: x\n", "not a date"),
    Case("empty !!int", replace("web: 2", 'web: !!int ""'), "is not an integer"),
    Case("!!int 0x", replace("web: 2", 'web: !!int "0x"'), "'0x' is not an integer"),
    Case("!!int sign only", replace("web: 2", 'web: !!int "-"'), "is not an integer"),
    Case("empty !!float", replace("web: 2", 'web: !!float ""'), "is not a number"),
    Case("!!float dot", replace("web: 2", 'web: !!float "."'), "is not a number"),
    Case("!!bool maybe", replace("web: 2", "web: !!bool maybe"), "'maybe' is not true or false"),
    Case("!!timestamp foo", replace("web: 2", "web: !!timestamp foo"), "'foo' is not a date or time"),
    Case("bad scalar deep in a list", replace("www.example.com", '!!int "x"'), "line 12, column 15"),
    Case("long bad scalar", replace("web: 2", "web: !!bool " + "m" * 100_000), "characters"),
    # -- keys given twice
    Case("duplicate project", VALID + "project: other\n", "duplicate key 'project'"),
    Case("duplicate environment", VALID + "  testing:\n    servers: {web: 1}\n", "duplicate key 'testing'"),
    # -- names that match only up to a newline
    Case("environment name with a newline", replace("  testing:\n", '  "testing\\n":\n'), "environment name"),
    Case("environment name too long", replace("  testing:\n", "  " + "t" * 500 + ":\n"), "environment name"),
    Case("project with a newline", replace("project: polls", 'project: "polls\\n"'), "project"),
    Case("wsgi with a newline", replace("polls.wsgi:application", '"polls.wsgi:application\\n"'), "app.wsgi"),
    Case("settings with a quote", replace("polls.settings", "polls.settings'"), "app.settings"),
    Case("celery with a space", replace("polls.celery:app", '"polls.celery:app x"'), "app.celery"),
    # -- values written into supervisor, INI, nginx or HAProxy files
    # (a list under `hosts` is the former spelling of `domains`)
    Case("hosts injecting a supervisor program", replace(
        "domains: [www.example.com, .example.org, 192.0.2.7]",
        'hosts: ["x\\n\\n[program:pwn]\\ncommand=/bin/sh -c id\\n"]'), "domains[0]"),
    Case("domains with a quote", replace("www.example.com", "'www.\"example.com'"), "domains[0]"),
    Case("domains with a space", replace("www.example.com", "'www example.com'"), "domains[0]"),
    Case("domains not a host name", replace("www.example.com", "-bad-.example"), "domains[0]"),
    Case("requirements with a newline", replace("requirements: requirements.txt", 'requirements: "req.txt\\nx"'),
         "app.requirements"),
    Case("manage with a control character", replace("manage: manage.py", 'manage: "manage\\x1b.py"'), "app.manage"),
    Case("source with a NUL", replace("app:\n", 'app:\n  source: "a\\0b"\n'), "app.source"),
    Case("python with a bidi override", replace("  manage: manage.py\n",
                                                '  manage: manage.py\n  python: "/usr/bin/python3\\u202e"\n'),
         "app.python"),
    # -- paths that leave the app, or reach the system
    Case("requirements outside the app", replace("requirements: requirements.txt",
                                                 "requirements: ../../../../etc/shadow"), "outside"),
    Case("requirements absolute", replace("requirements: requirements.txt", "requirements: /etc/shadow"),
         "absolute"),
    Case("requirements missing", replace("requirements: requirements.txt", "requirements: nope.txt"),
         "not a file"),
    Case("manage through a symlink out of the app", symlinked_manage, "outside"),
    Case("maintenance page outside the app", replace("  manage: manage.py\n",
                                                     "  manage: manage.py\n  maintenance_page: /etc/shadow\n"),
         "outside"),
    Case("source / to reach /etc as the app's files",
         replace("app:\n", "app:\n  source: /\n  maintenance_page: /etc/shadow\n")
         .replace("requirements: requirements.txt", "requirements: etc/shadow")
         .replace("manage: manage.py", "manage: etc/passwd"), "app.source: / is a system directory"),
    Case("source /etc", replace("app:\n", "app:\n  source: /etc\n"), "system directory"),
    Case("source inside /usr", replace("app:\n", "app:\n  source: /usr/share\n"), "system directory"),
    Case("source /root", replace("app:\n", "app:\n  source: /root\n"), "system directory"),
    Case("source through a symlink to /", symlinked_source, "system directory"),
    Case("maintenance page through a symlink out of the app", symlinked_page, "outside"),
    Case("backups into /etc/shadow", with_env("db: {backups: /etc/shadow}\n"), "system directory"),
    Case("backups into /", with_env("db: {backups: /}\n"), "system directory"),
    Case("backups into /tmp", with_env("db: {backups: /tmp}\n"), "system directory"),
    Case("backups into /var/lib", with_env("db: {backups: /var/lib/}\n"), "system directory"),
    Case("backups relative", with_env("db: {backups: backups}\n"), "absolute path"),
    Case("backups group-writable", group_writable_backups, "writable"),
    Case("backups new under a world-writable folder", with_env("db: {backups: /tmp/fabula-corpus-new/x}\n"),
         "writable by others"),
    Case("backups through a symlink to /etc", symlink_to_etc, "system directory"),
    Case("python is a shell", replace("  manage: manage.py\n", "  manage: manage.py\n  python: /bin/sh\n"),
         "python3"),
    Case("python relative", replace("  manage: manage.py\n", "  manage: manage.py\n  python: python3\n"),
         "absolute"),
    Case("python missing", replace("  manage: manage.py\n", "  manage: manage.py\n  python: /nope/python3\n"),
         "does not exist"),
    Case("python writable by others", writable_python, "root"),
    Case("source name too long", replace("app:\n", "app:\n  source: " + "s" * 300 + "\n"), "app.source"),
    Case("requirements name too long", replace("requirements: requirements.txt", "requirements: " + "r" * 300),
         "r" * 20),
    Case("backups name too long", with_env("db: {backups: /srv/" + "b" * 300 + "}\n"), "b" * 20),
    Case("python name too long",
         replace("  manage: manage.py\n", "  manage: manage.py\n  python: /" + "p" * 300 + "\n"), "app.python"),
    # -- subnets
    Case("subnet not private", with_env("subnet: 8.8.8.0/24\n"), "RFC 1918"),
    Case("subnet too large", with_env("subnet: 10.0.0.0/8\n"), "prefix length"),
    Case("subnet too small for the spare web server", with_env("subnet: 10.9.0.0/28\n"), "7 are needed"),
    Case("subnet with host bits", with_env("subnet: 10.9.0.1/24\n"), "subnet"),
    Case("subnets overlapping", with_env("subnet: 10.9.0.0/24\n") + "  staging:\n    subnet: 10.9.0.0/16\n"
         "    lb: {https_port: 9443, http_port: 9080}\n", "overlap"),
    # -- the load balancer
    Case("bind multicast", replace("bind: 127.0.0.1", "bind: 224.0.0.1"), "unicast"),
    Case("bind unspecified", replace("bind: 127.0.0.1", "bind: 0.0.0.0"), "unicast"),
    Case("bind broadcast", replace("bind: 127.0.0.1", "bind: 255.255.255.255"), "unicast"),
    Case("same bind:port in two environments", VALID + "  staging:\n    lb: {https_port: 8443, http_port: 9080}\n",
         "127.0.0.1:8443"),
    Case("http port of one is the https port of another",
         VALID + "  staging:\n    lb: {https_port: 8080, http_port: 9080}\n", "127.0.0.1:8080"),
    Case("certificate missing", replace("http_port: 8080}", "http_port: 8080, certificate: no.crt, key: no.key}"),
         "no such file"),
    Case("certificate not PEM", replace("http_port: 8080}",
                                        "http_port: 8080, certificate: requirements.txt, key: manage.py}"),
         "no PEM certificate"),
    Case("certificate is /etc/shadow-like FIFO-free directory",
         replace("http_port: 8080}", "http_port: 8080, certificate: /etc, key: /etc}"), "directory"),
    Case("certificate and key do not match", mismatched_pair, "is not the key of the certificate"),
    # -- input echoed only as an excerpt
    Case("long wsgi value", replace("polls.wsgi:application", "x" * 200_000 + "!"), "app.wsgi"),
    Case("long unknown key", VALID + '? "' + "k" * 200_000 + '"\n: 1\n', "unknown key"),
    Case("long plain key", VALID + "k" * 200_000 + ": 1\n", "invalid YAML"),
    Case("many unknown keys", VALID + "".join(f"k{i}: {i}\n" for i in range(5000)), "more errors"),
    Case("many environments", VALID + "".join(f"  e{i}: {{}}\n" for i in range(500)), "at most 64"),
    Case("target infinite", with_env("autoscaling: {target: .inf}\n"), "autoscaling.target"),
    Case("cooldown NaN", with_env("autoscaling: {scale_in_cooldown: .nan}\n"), "scale_in_cooldown"),
    Case("integer key at the top", VALID + "1: 2\n", "Keys should be strings"),
    Case("bytes where text goes", replace("polls.settings", "!!binary cG9sbHMKc2V0dGluZ3M="), "app.settings"),
]


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """`fabula describe testing -c CONFIG` in this process, the real CLI (typer builds its command
    once rather than per call, which costs a tenth of a second): (exit status, stderr, traceback)."""
    import typer.main

    built = {}
    real = typer.main.get_command
    monkeypatch.setattr(typer.main, "get_command",
                        lambda app: built.get(id(app)) or built.setdefault(id(app), real(app)))
    monkeypatch.setenv("FABULA_STATE_DIR", str(tmp_path / "state"))
    return lambda config: run_in_process(config, capsys, monkeypatch)


def run_in_process(config: Path, capsys, monkeypatch) -> tuple[int | None, str, str]:
    code, problem = None, ""
    err = io.StringIO()
    try:
        code = main(["describe", "testing", "-c", str(config)],
                    CliEnvironment(stdout=io.StringIO(), stderr=err, stdin_isatty=False, euid=0,
                                   state_root=Path(os.environ["FABULA_STATE_DIR"])))
    except BaseException as exc:  # noqa: BLE001 - what the corpus is looking for
        import traceback
        problem = "".join(traceback.format_exception(exc))
    return code, err.getvalue() + capsys.readouterr().err, problem


def check_refusal(code, err: str, problem: str, named: str, expect: str) -> list[str]:
    failures = []
    if problem or "Traceback" in err:
        failures.append(f"traceback:\n{problem or err}")
    if code != 2:
        failures.append(f"exit {code}, not 2")
    if named not in err:
        failures.append(f"the file {named!r} is not named")
    if "fix:" not in err:
        failures.append("no `fix:` line")
    if len(err) > MAX_MESSAGE:
        failures.append(f"{len(err)} characters of message")
    if expect and expect not in err:
        failures.append(f"{expect!r} not in the message")
    return failures


@pytest.mark.timeout(600)
def test_the_corpus_of_bad_files_gives_clean_errors(tmp_path, capsys, cli):
    tried, clean, tracebacks, report = 0, 0, 0, []
    for number, case in enumerate(CASES):
        folder = tmp_path / f"case{number}"
        config = make_project(folder)
        content = case.content(folder) if callable(case.content) else case.content
        config.write_bytes(content.encode() if isinstance(content, str) else content)
        started = time.monotonic()
        code, err, problem = cli(config)
        elapsed = time.monotonic() - started
        failures = check_refusal(code, err, problem, str(config), case.expect)
        if elapsed > 30:  # a hang (e.g. an alias bomb being expanded), not a slow machine
            failures.append(f"took {elapsed:.1f}s")
        tried += 1
        tracebacks += bool(problem or "Traceback" in err)
        clean += not failures
        if failures:
            report.append(f"{case.name}: " + "; ".join(failures) + f"\n    stderr: {err[:600]!r}")
    assert not (tmp_path / "state").exists()  # nothing was created
    with capsys.disabled():
        print(f"\ncorpus: {tried} cases tried, {clean} clean errors, {tracebacks} tracebacks")
    assert not report, "\n".join(report)


def test_the_valid_corpus_base_loads(tmp_path):
    loaded = load_config(make_project(tmp_path))
    assert loaded.environment("testing").domains == ["www.example.com", ".example.org", "192.0.2.7"]


# -- what the CLI is given as the config, rather than what it holds ---------------------------------

def test_a_directory_and_impossible_paths_as_the_config(tmp_path, cli):
    make_project(tmp_path)
    cases = {"directory": tmp_path,
             "name too long": tmp_path / ("x" * 300 + ".yml"),              # one name longer than NAME_MAX
             "path too long": Path("/".join(["ab"] * 3000) + ".yml"),       # a path longer than PATH_MAX
             "under a file": tmp_path / "requirements.txt" / "fabula.yml",  # ENOTDIR
             "a symlink loop": tmp_path / "loop.yml",
             "missing": tmp_path / "nope.yml"}
    (tmp_path / "loop.yml").symlink_to(tmp_path / "loop.yml")
    for name, config in cases.items():
        code, err, problem = cli(config)
        failures = check_refusal(code, err, problem, str(config)[-100:], "")
        assert not failures, f"{name}: {failures}: {err[:500]!r}"
    assert not (tmp_path / "state").exists()


@pytest.mark.timeout(60)
def test_a_fifo_as_the_config_does_not_hang(tmp_path):
    make_project(tmp_path)
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    env = {**os.environ, "FABULA_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([*fabula_argv(), "describe", "testing", "-c", str(fifo)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)  # a hang fails
    assert not check_refusal(result.returncode, result.stderr, "", str(fifo), "not a regular file"), result.stderr


# -- properties: whatever the file holds, it loads or it is refused cleanly --------------------------

@pytest.fixture(scope="module")
def property_project():
    with tempfile.TemporaryDirectory() as folder:
        config = make_project(Path(folder) / "app")
        cert, key = tls_pair(config.parent, "lb")
        yield config


def loads_or_refuses(config: Path, content: bytes) -> None:
    config.write_bytes(content)
    started = time.monotonic()
    try:
        load_config(config)
    except ConfigError as exc:
        message = str(exc)
        assert "fix:" in message and str(config) in message, message[:500]
        assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:300]!r}"
    assert time.monotonic() - started < 5


PROPERTY_SETTINGS = settings(max_examples=100, deadline=dt.timedelta(seconds=30), derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(data=st.data())
def test_random_bytes_anywhere_load_or_are_refused(property_project, data):
    base = VALID.encode()
    position = data.draw(st.integers(0, len(base)))
    cut = data.draw(st.integers(0, 8))
    insert = data.draw(st.binary(max_size=24) | st.sampled_from(
        [b"\x00", b"\xff\xfe", b"&a ", b"*a", b"\n  testing:\n", b"<<: ", b"[" * 64, b"9" * 200, b"\t", b"\r",
         b"\xc3", b"\xe2\x80\xae", b"'", b'"', b"!!binary ", b"!!python/name:os.system", b"? ", b"!!int ",
         b"!!float ", b"!!bool ", b"!!timestamp ", b" 2001-02-30", b" /\n"]))
    loads_or_refuses(property_project, base[:position] + insert + base[position + cut:])


KEY_PATHS = [
    ("project",), ("app",), ("app", "source"), ("app", "wsgi"), ("app", "settings"), ("app", "requirements"),
    ("app", "celery"), ("app", "manage"), ("app", "maintenance_page"), ("app", "python"), ("environments",),
    ("environments", "testing"), ("environments", "testing", "subnet"), ("environments", "testing", "domains"),
    ("environments", "testing", "domains", 0), ("environments", "testing", "lb"),
    ("environments", "testing", "lb", "bind"), ("environments", "testing", "lb", "https_port"),
    ("environments", "testing", "lb", "certificate"), ("environments", "testing", "lb", "key"),
    ("environments", "testing", "servers"), ("environments", "testing", "servers", "web"),
    ("environments", "testing", "db"), ("environments", "testing", "db", "backups"),
    ("environments", "testing", "db", "backups_host"),
    ("environments", "testing", "autoscaling"), ("environments", "testing", "autoscaling", "max"),
    ("environments", "testing", "autoscaling", "target"), ("environments", "testing", "gunicorn_workers"),
    ("environments", "staging"), ("environments", "testing", "production"), ("unknown",),
]

LONG_TEXT = "a" * 2000
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**40, max_value=10**60)
           | st.floats() | st.text(max_size=40) | st.sampled_from([
               "lb.crt", "lb.key", "requirements.txt", "../x", "/etc/shadow", "/", "/usr/bin/python3", "/bin/sh",
               "10.9.0.0/24", "10.0.0.0/8", "8.8.8.0/24", "224.0.0.1", "0.0.0.0", "127.0.0.2", "x\ny",
               "[program:x]", LONG_TEXT, "testing\n", "polls.wsgi:application", "-1", "1e999"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10) | st.sampled_from(["web", "min", "bind"]), inner,
                                        max_size=4), max_leaves=12)


def set_at(tree, path: tuple, value) -> None:
    for part in path[:-1]:
        child = tree[part] if isinstance(tree, dict) and part in tree else (
            tree[part] if isinstance(tree, list) and isinstance(part, int) and part < len(tree) else None)
        if not isinstance(child, (dict, list)):
            child = {}
            if isinstance(tree, dict):
                tree[part] = child
            else:
                return
        tree = child
    last = path[-1]
    if isinstance(tree, dict):
        tree[last] = value
    elif isinstance(tree, list) and isinstance(last, int) and last < len(tree):
        tree[last] = value


@PROPERTY_SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(KEY_PATHS), values), min_size=1, max_size=3))
def test_random_values_at_random_keys_load_or_are_refused(property_project, changes):
    tree = yaml.safe_load(VALID)
    for path, value in changes:
        set_at(tree, path, value)
    loads_or_refuses(property_project, yaml.safe_dump(tree, allow_unicode=True).encode())
