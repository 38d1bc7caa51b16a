"""The docs site builds strictly (`mkdocs build --strict`: a page missing from the nav, a
broken link or anchor fails it), and README.md's links into docs/ point at pages that exist."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

def _build(root, site) -> subprocess.CompletedProcess:
  # Skipped where it runs, not at collection: CI's oldest stage collects this file and
  # deselects it (-m), and a collection-time skip would count as a skip there.
  pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
  return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                         "-f", os.path.join(root, "mkdocs.yml"), "-d", str(site)],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_docs_site_builds_strictly(tmp_path):
  proc = _build(REPO, tmp_path / "site")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "site" / "index.html").exists()


def test_a_broken_anchor_or_link_fails_the_build(tmp_path):
  for planted in ("[x](moe.md#no-such-section)", "[x](no_such_page.md)"):
    root = tmp_path / planted[4:9]
    shutil.copytree(os.path.join(REPO, "docs"), root / "docs")
    shutil.copy(os.path.join(REPO, "mkdocs.yml"), root / "mkdocs.yml")
    with open(root / "docs" / "index.md", "a") as f:
      f.write(f"\n{planted}\n")
    proc = _build(root, root / "site")
    assert proc.returncode != 0 and ("no-such-section" in proc.stderr
                                     or "no_such_page.md" in proc.stderr), proc.stderr[-2000:]


def test_readme_links_into_docs_exist():
  with open(os.path.join(REPO, "README.md")) as f:
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", f.read())
  assert len(links) >= 12
  missing = [l for l in links if not os.path.exists(os.path.join(REPO, l))]
  assert not missing, missing
