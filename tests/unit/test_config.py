"""fabula.yml validation: each mistake gets one message naming the file, the key and the fix."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fabula.config import load_config
from fabula.errors import ConfigError
from tests.helpers import SAMPLE_APP

VALID = """\
project: polls
app:
  wsgi: polls.wsgi:application
  settings: polls.settings
environments:
  testing:
    servers: {web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}
    lb: {bind: 127.0.0.1, https_port: 8443, http_port: 8080}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fabula.yml"
    path.write_text(textwrap.dedent(text))
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_the_sample_apps_config_is_valid():
    config = load_config(SAMPLE_APP / "fabula.yml")
    env = config.environment("testing")
    assert env.servers.by_role() == {"db-primary": 1, "db-replica": 1, "cache": 1, "worker": 1, "web": 2}
    assert config.source_dir == SAMPLE_APP.resolve()
    assert config.project.app.celery == "polls.celery:app"


def test_defaults_fill_what_is_left_out(tmp_path):
    config = load_config(write(tmp_path, "project: p\napp: {wsgi: a.wsgi, settings: a.settings}\n"
                                         "environments: {staging: {}}\n"))
    env = config.environment("staging")
    assert (env.provider, env.lb.https_port, env.servers.web) == ("local", 8443, 2)


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = error_for(tmp_path, "project: polls\napp: [unclosed\n")
    assert "fabula.yml" in message and "line 3" in message and "invalid YAML" in message


def test_unknown_key_is_named_with_its_path(tmp_path):
    message = error_for(tmp_path, VALID.replace("lb:", "lbb:"))
    assert "environments.testing.lbb: unknown key 'lbb'" in message


def test_wrong_type_says_what_is_expected(tmp_path):
    message = error_for(tmp_path, VALID.replace("https_port: 8443", "https_port: high"))
    assert "environments.testing.lb.https_port" in message and "integer" in message


def test_unknown_role_lists_the_roles(tmp_path):
    message = error_for(tmp_path, VALID.replace("cache: 1", "memcache: 1"))
    assert "environments.testing.servers.memcache: unknown role 'memcache'" in message
    assert "web, worker, cache, db-primary, db-replica" in message


def test_zero_web_servers_is_refused(tmp_path):
    message = error_for(tmp_path, VALID.replace("web: 2", "web: 0"))
    assert "environments.testing.servers.web: at least 1 web server(s) are needed (got 0)" in message


def test_an_address_pool_too_small_is_refused(tmp_path):
    # 6 servers and one web server more while one is replaced: 7 addresses; a /28 holds 5
    message = error_for(tmp_path, VALID + "    subnet: 10.99.0.0/28\n")
    assert "environments.testing" in message and "holds 5 server addresses but 7 are needed" in message
    assert "fix:" in message
    message = error_for(tmp_path, VALID + "    subnet: 10.99.0.0/29\n")
    assert "environments.testing.local.subnet" in message and "from /16 to /28" in message


def test_certificate_without_key_is_refused(tmp_path):
    message = error_for(tmp_path, VALID.replace("http_port: 8080}", "http_port: 8080, certificate: /x.pem}"))
    assert "environments.testing.lb" in message and "both `certificate` and `key`" in message


def test_unknown_environment_lists_the_known_ones(tmp_path):
    config = load_config(write(tmp_path, VALID))
    with pytest.raises(ConfigError, match="no environment 'prod'.*\n.*use one of: testing"):
        config.environment("prod")


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="no such file.*\n.*-c PATH"):
        load_config(tmp_path / "nope.yml")


# -- what a valid file may say, and where its paths lead ------------------------------------------

def test_tls_pair_is_read_relative_to_the_config_and_kept_absolute(tmp_path, monkeypatch):
    from tests.unit.test_config_corpus import tls_pair

    tls_pair(tmp_path, "site")
    monkeypatch.chdir("/")
    config = load_config(write(tmp_path, VALID.replace(
        "http_port: 8080}", "http_port: 8080, certificate: site.crt, key: site.key}")))
    lb = config.environment("testing").lb
    assert (lb.certificate, lb.key) == (tmp_path / "site.crt", tmp_path / "site.key")


def test_host_names_and_addresses_are_accepted(tmp_path):
    hosts = "    hosts: [example.com, .example.org, a-b.c.example, 10.1.2.3, '::1']\n"
    config = load_config(write(tmp_path, VALID + hosts))
    assert config.environment("testing").domains[-1] == "::1"


def test_environments_on_their_own_subnets_and_ports_load(tmp_path):
    config = load_config(write(tmp_path, VALID + "    subnet: 10.9.0.0/27\n"
                               "  staging:\n    subnet: 10.9.0.32/27\n    lb: {https_port: 9443, http_port: 9080}\n"
                               "  other:\n    lb: {bind: 127.0.0.2}\n"))
    assert str(config.environment("staging").subnet) == "10.9.0.32/27"


def test_backups_in_a_folder_of_root_alone_are_accepted(tmp_path):
    owned = tmp_path / "owned"
    owned.mkdir(mode=0o700)
    for target in (owned, owned / "new" / "deeper"):
        config = load_config(write(tmp_path, VALID + f"    db: {{backups: {target}}}\n"))
        assert config.environment("testing").db.backups == target


def test_an_explicit_python3_is_accepted_and_app_files_are_checked_when_set(tmp_path):
    (tmp_path / "reqs").mkdir()
    (tmp_path / "reqs" / "prod.txt").write_text("django\n")
    config = load_config(write(tmp_path, VALID.replace(
        "  settings: polls.settings\n",
        "  settings: polls.settings\n  python: /usr/bin/python3\n  requirements: reqs/prod.txt\n")))
    assert config.project.app.requirements == "reqs/prod.txt"
    message = error_for(tmp_path, VALID.replace("  settings: polls.settings\n",
                                                "  settings: polls.settings\n  requirements: reqs/none.txt\n"))
    assert "app.requirements: reqs/none.txt is not a file" in message and "fix:" in message


def test_the_maintenance_page_is_resolved_inside_the_source(tmp_path):
    (tmp_path / "down.html").write_text("<p>down</p>")
    config = load_config(write(tmp_path, VALID.replace("  settings: polls.settings\n",
                                                       "  settings: polls.settings\n  maintenance_page: down.html\n")))
    assert config.project.app.maintenance_page == tmp_path / "down.html"


def test_environment_names_match_whole(tmp_path):
    message = error_for(tmp_path, VALID.replace("  testing:\n", '  "testing\\n":\n'))
    assert "environment name 'testing\\n' must match" in message


def test_an_old_style_message_is_kept_for_a_top_level_that_is_no_mapping(tmp_path):
    assert "expected a mapping with `project`, `app` and `environments`" in error_for(tmp_path, "- a\n")


def test_an_app_in_a_folder_of_var_tmp_is_accepted():
    # /var/tmp is a system tree for db.backups (anyone may write there), but a user's own folder
    # in it is fine for the app's code (the tests keep their sample apps there)
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="fabula-config-", dir="/var/tmp"))
    try:
        (base / "requirements.txt").write_text("")
        assert load_config(write(base, VALID)).source_dir == base.resolve()
    finally:
        shutil.rmtree(base)
