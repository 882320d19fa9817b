"""Every relative link in README.md and in the committed docs points at a file git tracks (a report that only
lives on one machine, or that .gitignore swallowed, does not exist for anyone else)."""
import posixpath
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def _links(text: str) -> list[str]:
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    return [u for u in found if not re.match(r"^[a-z][a-z0-9+.-]*:", u) and not u.startswith("#")]


def _resolve(doc: str, link: str) -> str:
    """The repository path a relative link in doc points at ('..' resolved, '#anchor' dropped)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(doc), link.split("#")[0]))


def test_relative_links_point_at_tracked_files():
    tracked = _tracked()
    docs = ["README.md"] + sorted(f for f in tracked if f.startswith("docs/") and f.endswith(".md"))
    broken = []
    for doc in docs:
        for link in _links((ROOT / doc).read_text()):
            norm = _resolve(doc, link)
            if norm not in tracked and not any(t.startswith(norm + "/") for t in tracked):
                broken.append(f"{doc} -> {link}")
    assert not broken, "links to files git does not track: " + ", ".join(broken)
    assert any(d.startswith("docs/results/") for d in docs), "the comparison report is not committed"


def test_the_link_check_catches_a_missing_file():
    assert _links("see [r](docs/results/x.md) and ![f](a.png) and [w](https://x.org) [s](#sec)") == \
        ["docs/results/x.md", "a.png"]
    assert _resolve("docs/results/compare-flow/report.md", "../compare/report.md#x") == "docs/results/compare/report.md"
    assert _resolve("README.md", "./docs/a.png") == "docs/a.png"


def test_readme_result_numbers_are_the_committed_jsons():
    """Every number in the README's generated result blocks is recomputed from docs/results (and the shipped
    model's card); a README edited by hand, or results changed without regenerating it, fails here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import readme_results

    assert readme_results.main(["--check"]) == 0
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in readme_results.BLOCKS:
        assert f"<!-- generated:{name} -->" in text
