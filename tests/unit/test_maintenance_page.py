"""The maintenance page is read as root and served by every web server to anyone: it must be the
file of the app that fabula.yml named and load checked, not what a symbolic link put in its place
since, nor a file reached through a folder swapped for a link; and app.source may not be a system
folder, which would make /etc/shadow a file "of the app"."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabula.config import load_config
from fabula.errors import ConfigError
from fabula.maintenance import DEFAULT_PAGE, directory, install_page
from fabula.testing import FakeHost
from tests.unit.test_config_corpus import VALID, make_project


def project(folder: Path, page: str | None) -> SimpleNamespace:
    """A loaded fabula.yml in `folder` with `page` as app.maintenance_page: what install_page reads."""
    config = make_project(folder)
    if page is not None:
        config.write_text(VALID.replace("  manage: manage.py\n", f"  manage: manage.py\n  maintenance_page: {page}\n"))
    return SimpleNamespace(config=load_config(config))


def page_gone_after_load(tmp_path: Path) -> tuple[SimpleNamespace, Path]:
    """A project loaded with down.html as its page, which is then removed for the test to replace."""
    page = tmp_path / "app" / "down.html"
    page.parent.mkdir()
    page.write_text("<h1>back soon</h1>\n")
    ctx = project(tmp_path / "app", "down.html")
    page.unlink()
    return ctx, page


def served(host: FakeHost) -> bytes | None:
    return host.read(directory(host) / "index.html")


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "secret.html"
    path.parent.mkdir()
    path.write_text("root's secret\n")
    return path


def test_the_page_of_the_app_is_served_and_the_default_without_one(tmp_path):
    (tmp_path / "app" / "pages").mkdir(parents=True)
    (tmp_path / "app" / "pages" / "down.html").write_text("<h1>back soon</h1>\n")
    ctx = project(tmp_path / "app", "pages/down.html")
    host = FakeHost("web1", "web", "10.0.0.10")
    install_page(ctx, host)
    assert served(host) == b"<h1>back soon</h1>\n"
    install_page(project(tmp_path / "other", None), host)
    assert served(host) == DEFAULT_PAGE.read_bytes()


def test_a_page_replaced_by_a_symbolic_link_after_load_is_refused(tmp_path, secret):
    ctx, page = page_gone_after_load(tmp_path)
    page.symlink_to(secret)
    host = FakeHost("web1", "web", "10.0.0.10")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        install_page(ctx, host)
    assert served(host) is None


def test_a_page_reached_through_a_folder_swapped_for_a_link_is_refused(tmp_path, secret):
    pages = tmp_path / "app" / "pages"
    pages.mkdir(parents=True)
    (pages / "secret.html").write_text("<h1>back soon</h1>\n")
    ctx = project(tmp_path / "app", "pages/secret.html")
    pages.rename(tmp_path / "app" / "pages.old")
    pages.symlink_to(secret.parent)  # pages/secret.html is now the file outside
    host = FakeHost("web1", "web", "10.0.0.10")
    with pytest.raises(ConfigError, match="outside the app's folder"):
        install_page(ctx, host)
    assert served(host) is None


@pytest.mark.timeout(30)
def test_a_fifo_in_place_of_the_page_is_refused_without_waiting(tmp_path):
    ctx, page = page_gone_after_load(tmp_path)
    os.mkfifo(page)
    with pytest.raises(ConfigError, match="not a regular file"):
        install_page(ctx, FakeHost("web1", "web", "10.0.0.10"))


@pytest.mark.parametrize("source", ["/", "/etc", "/usr/lib", "/var/log"])
def test_a_system_folder_is_no_apps_source(tmp_path, source):
    config = make_project(tmp_path)
    app = VALID.replace("app:\n", f"app:\n  source: {source}\n  maintenance_page: /etc/shadow\n")
    config.write_text(app.replace("requirements: requirements.txt", "requirements: etc/shadow")
                      .replace("manage: manage.py", "manage: etc/passwd"))
    with pytest.raises(ConfigError, match=f"app.source: {source} is a system directory"):
        load_config(config)
