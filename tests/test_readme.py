"""The README's commands are the contract with a new user: CI must run exactly the documented test command."""
import re

from conftest import ROOT


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"\n{ci_command}\n" in readme, f"README.md must show the CI test command verbatim: {ci_command}"


def test_every_file_in_the_readme_map_exists():
    readme = (ROOT / "README.md").read_text()
    file_map = readme.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    files = re.findall(r"^\| `([\w./-]+)` \|", file_map, re.M)
    assert files, "README.md has no file map"
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"README.md maps files that do not exist: {missing}"
