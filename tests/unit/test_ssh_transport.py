"""The ssh transport's pure parts: the env block, the command line sshd receives, the marker that
drops a login shell's noise, the OpenSSH client's command. The command line is also run here for
real, through a local `sh -c` standing in for the host's login shell: no network, no root."""
from __future__ import annotations

import datetime as dt
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabula.providers.ssh.transport import Demarker, SshTarget, env_block, remote_command, ssh_argv

MARKER = "fabula-0123456789abcdef"


def on_host(argv: list[str], env: dict[str, str] | None = None, *, input: bytes = b"", block: bytes | None = None,
            noise: str = "", **kwargs) -> tuple[int, bytes, bytes]:
    """What the transport sees for `argv`: the command line run by a login shell that prints
    `noise` first (as a noisy ~/.bashrc does), fed the env block and input, with the marker's
    prefix dropped."""
    block = env_block(env) if block is None else block
    line = remote_command(argv, env_source=len(env_block(env)), marker=MARKER, **kwargs)
    shell = f"printf %s {shlex.quote(noise)}; printf %s {shlex.quote(noise)} >&2; {line}"
    done = subprocess.run(["sh", "-c", shell], input=block + input, capture_output=True, timeout=30)
    out, err = Demarker(MARKER), Demarker(MARKER)
    return done.returncode, out.feed(done.stdout) + out.end(), err.feed(done.stderr) + err.end()


def test_env_block_quotes_values_and_ends_with_the_sentinel():
    assert env_block({"A": "it's", "B": "$(id)\n"}) == (
        b"export LANG=C.UTF-8\nexport A='it'\"'\"'s'\nexport B='$(id)\n'\nfabula_env_done=1\n")


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "Ä", "A\n"])
def test_env_block_refuses_what_is_no_variable_name(name):
    with pytest.raises(ValueError, match="not an environment variable name"):
        env_block({name: "x"})


def test_env_block_and_command_line_refuse_a_nul_byte():
    with pytest.raises(ValueError, match="NUL"):
        env_block({"A": "a\0b"})
    with pytest.raises(ValueError, match="NUL"):
        remote_command(["echo", "a\0b"], env_source=1)
    with pytest.raises(ValueError, match="no command"):
        remote_command([], env_source=1)


def test_the_command_line_holds_no_env_value_and_quotes_every_argument():
    env = {"SECRET": "hunter2"}
    line = remote_command(["echo", "a b", "it's", "$HOME"], env_source=len(env_block(env)), marker=MARKER,
                          timeout=0.5, cwd="/srv/x y")
    assert "hunter2" not in line
    words = shlex.split(line)
    assert words[:3] == ["exec", "env", "-i"] and words[4:6] == ["/bin/sh", "-c"]
    assert words[7:] == ["fabula-ssh", str(len(env_block(env))), MARKER, "", "0.5", "/srv/x y",
                         "echo", "a b", "it's", "$HOME"]


def test_the_command_line_switches_user_and_uses_sudo_only_when_asked():
    words = shlex.split(remote_command(["id"], env_source=1, user="root", timeout=120, sudo=True))
    assert words[:4] == ["exec", "sudo", "-n", "env"]
    assert words[-4:] == ["", "120", "/", "id"]   # root: no user switch
    assert shlex.split(remote_command(["id"], env_source=1, user="www"))[-4] == "www"


def test_argv_and_env_arrive_exactly_and_nothing_else():
    argv = ["printf", "%s|", "a b", "it's", '"q"', "$HOME", "`id`", "\\", "*", "é", "line\nbreak", ""]
    env = {"TRICKY": "it's \"q\" $(id) `id` \\ é\nsecond\n", "PATH": "/usr/bin:/bin", "_x1": ""}
    code, out, err = on_host(argv, env)
    assert (code, err) == (0, b"")
    assert out.decode() == "|".join(argv[2:]) + "|"
    names = {entry.split("=", 1)[0] for entry in on_host(["env", "-0"], env)[1].decode().split("\0") if entry}
    assert names == {"PATH", "LANG", "HOME", "TRICKY", "_x1"}
    assert on_host(["printenv", "TRICKY"], env)[1].decode() == env["TRICKY"] + "\n"


def test_input_follows_the_env_block_on_stdin():
    assert on_host(["cat"], {"A": "x" * 5000}, input=b"the input\x00\xff")[1] == b"the input\x00\xff"


def test_a_truncated_env_block_runs_nothing(tmp_path: Path):
    flag = tmp_path / "ran"
    whole = env_block({"A": "value"})
    for cut in (0, 1, len(whole) // 2, len(whole) - 2):
        code, _, err = on_host(["touch", str(flag)], {"A": "value"}, block=whole[:cut])
        assert code != 0 and not flag.exists(), (cut, err)
    assert on_host(["touch", str(flag)], {"A": "value"})[0] == 0 and flag.exists()


def test_a_noisy_login_shell_changes_no_output():
    assert on_host(["printf", "exact"], noise="junk without a newline") == (0, b"exact", b"")
    code, out, err = on_host(["sh", "-c", "echo out; echo err >&2; exit 3"], noise="junk\n")
    assert (code, out, err) == (3, b"out\n", b"err\n")


def test_demarker_across_chunks_and_without_a_marker():
    d = Demarker("MARK")
    assert [d.feed(b"noise MA"), d.feed(b"RK"), d.feed(b"\nout MARK\n"), d.end()] == [b"", b"", b"out MARK\n", b""]
    d = Demarker("MARK")
    assert d.feed(b"fabula: no user x\n") == b"" and d.end() == b"fabula: no user x\n"


def test_a_timeout_ends_the_command_with_124():
    assert on_host(["sleep", "30"], timeout=0.2)[0] == 124


@settings(max_examples=60, deadline=dt.timedelta(seconds=10), derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(st.text(st.characters(blacklist_characters="\0"), max_size=20), min_size=1, max_size=5),
       value=st.text(st.characters(blacklist_characters="\0"), max_size=40))
def test_any_argument_and_value_arrive_unchanged(argv, value):
    code, out, err = on_host(["sh", "-c", 'printf "%s\\0" "$V" "$@"', "sh", *argv], {"V": value})
    assert code == 0, err
    assert out.decode().split("\0")[:-1] == [value, *argv]


def test_jump_target_and_openssh_command():
    target = SshTarget("10.0.0.11", port=2200, user="deploy", key=Path("/k/id"), known_hosts=Path("/k/known"),
                       jump="ops@bastion.example.com:2222")
    jump = target.jump_target()
    assert jump == SshTarget("bastion.example.com", 2222, "ops", Path("/k/id"), Path("/k/known"), None)
    assert SshTarget("h", user="u", jump="b").jump_target() == SshTarget("b", 22, "u")
    argv = ssh_argv(target, tty=True)
    assert argv[:2] == ["ssh", "-t"] and argv[-1] == "10.0.0.11" and "-J" not in argv
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-l") + 1] == "deploy"
    assert "UserKnownHostsFile=/k/known" in argv and "StrictHostKeyChecking=yes" in argv
    proxy = shlex.split(next(a for a in argv if a.startswith("ProxyCommand="))[len("ProxyCommand="):])
    assert proxy[:3] == ["ssh", "-W", "%h:%p"] and proxy[-1] == "bastion.example.com"
    assert {"-i", "/k/id", "UserKnownHostsFile=/k/known", "StrictHostKeyChecking=yes", "2222", "ops"} <= set(proxy)
    assert ssh_argv(SshTarget("h"), tty=False)[1] == "-T"
