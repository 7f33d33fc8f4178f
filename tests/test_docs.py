"""The README stays short and every relative link in it and in docs/ leads somewhere (file and heading)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"stages.md", "formats.md", "method.md", "explorer.md", "adaptation.md", "speed.md",
            "checkpoints.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue                                   # http:, https:, mailto: are not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_anchor_rule():
    """The slug rule above, on headings whose GitHub ids are known."""
    page = ROOT / "docs" / "formats.md"
    assert "top-k-masking-dirclassify-written-by-classify" in anchors(page)
    assert "comparison-dircomparename-written-by-compare" in anchors(page)


STAGES = ["cache", "train", "evaluate", "quickstart", "analyze", "classify", "serve", "report", "adapt", "compare",
          "adapt-study", "models", "datasets", "import", "export", "paper", "ablate"]


def test_every_stage_option_is_in_the_stages_page(capsys):
    """docs/stages.md lists each stage's options; rerun scripts/docs_options.py when an option is added."""
    from patchsae import cli

    page = (ROOT / "docs" / "stages.md").read_text()
    missing = []
    for stage in STAGES:
        assert f"\n## {stage}\n" in page, stage
        section = page.split(f"\n## {stage}\n", 1)[1].split("\n## ", 1)[0]
        with pytest.raises(SystemExit):
            cli.main([stage, "--help"])
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}:
            if option not in section:
                missing.append(f"{stage} {option}")
    assert not missing, f"not in docs/stages.md (run scripts/docs_options.py): {missing}"
